//! The DEW alias endpoints, which are resource paths rather than `kms/{operation}` verbs:
//! `POST kms/aliases` (create), `GET kms/aliases?key_id=&limit=&marker=` (list),
//! `DELETE kms/aliases` with a JSON body (delete) and `POST kms/alias/associate` (move).
//!
//! The list answer is a JSON array holding one `{aliases, page_info}` object: the official SDK
//! (huaweicloudsdkkms 3.1.219) declares the response as `body: list[ListAliasResponseBody]` and
//! deserializes the whole body as that list, so an object would reach it as garbage.

use serde_json::{json, Map, Value};

use super::authz::Caller;
use super::dew_fields::{bad_param, Body, API};
use super::errors::ApiError;
use super::Outcome;
use crate::kms::{
    normalize_alias, AliasInfo, EncryptionContext, KeyStore, KmsError, MAX_ALIASES_PER_KEY,
};

/// Default and largest page of list-aliases.
const DEFAULT_LIMIT: u64 = 50;

/// `alias/name` checked as the key store will, refused naming the field.
fn alias_field(field: &str, value: &str) -> Result<String, ApiError> {
    normalize_alias(value).map_err(|e| match e {
        KmsError::InvalidArgument(why) => bad_param(field, &format!("is not valid: {why}")),
        other => ApiError::from_kms(API, &other, false),
    })
}

fn entity(a: &AliasInfo, domain: &str) -> Value {
    let ms = |s: u64| (s * 1000).to_string();
    json!({
        "domain_id": domain,
        "key_id": a.key_id.to_string(),
        "alias": a.alias,
        "alias_urn": format!("kms:local:{domain}:{}", a.alias),
        "create_time": ms(a.creation_date),
        "update_time": ms(a.update_date),
    })
}

/// The query string of list-aliases as a body (every value a string, as the SDK sends them).
pub(super) fn query_object(query: Option<&str>) -> Map<String, Value> {
    let mut m = Map::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| String::from_utf8_lossy(&super::sign::percent_decode(s)).into_owned();
        m.insert(dec(k), Value::String(dec(v)));
    }
    m
}

/// Runs one alias operation (create-alias, list-aliases, delete-alias, associate-alias) for an
/// authenticated caller; `mod.rs` names it from the path and method.
pub(super) fn dispatch(
    ks: &KeyStore,
    caller: &Caller,
    op: &str,
    body: &Body<'_>,
    outcome: &mut Outcome,
) -> Result<Value, ApiError> {
    if caller.read_only && op != "list-aliases" {
        return Err(ApiError::forbidden(
            API,
            format!("credential {} is read-only: it cannot {op}", caller.name),
        ));
    }
    let kms = |e: KmsError| ApiError::from_kms(API, &e, false);
    let domain = ks.store_id().simple().to_string();
    let none = EncryptionContext::new();
    match op {
        "create-alias" => {
            let key = body.str_req("key_id")?;
            outcome.key = Some(key.to_string());
            caller.check_id(ks, API, key, &["manage"], &none, outcome)?;
            let alias = alias_field("alias", body.str_req("alias")?)?;
            let a = ks.create_alias(key, &alias).map_err(kms)?;
            Ok(entity(&a, &domain))
        }
        "list-aliases" => {
            let key = match body.str_opt("key_id")? {
                None | Some("") => None,
                Some(k) => {
                    outcome.key = Some(k.to_string());
                    Some(caller.check_id(ks, API, k, &["describe-key"], &none, outcome)?)
                }
            };
            let all: Vec<AliasInfo> = ks
                .list_aliases()
                .map_err(kms)?
                .into_iter()
                .filter(|a| key.is_none_or(|k| a.key_id == k))
                .filter(|a| caller.allows_id(ks, a.key_id))
                .collect();
            let (start, end) = super::dew_fields::page_range(body, DEFAULT_LIMIT, all.len())?;
            let page = all.get(start..end).unwrap_or_default();
            let next = if end < all.len() {
                end.to_string()
            } else {
                String::new()
            };
            Ok(json!([{
                "aliases": page.iter().map(|a| entity(a, &domain)).collect::<Vec<_>>(),
                "page_info": {"next_marker": next, "current_count": page.len()},
            }]))
        }
        "delete-alias" => {
            let key = body.str_req("key_id")?;
            outcome.key = Some(key.to_string());
            caller.check_id(ks, API, key, &["manage"], &none, outcome)?;
            let list = match body.0.get("aliases") {
                None | Some(Value::Null) => {
                    return Err(ApiError::bad_request(
                        API,
                        "KMS.0204",
                        "the parameter aliases is missing",
                    ))
                }
                Some(Value::Array(l)) => l,
                Some(_) => return Err(bad_param("aliases", "must be a list of aliases")),
            };
            if list.is_empty() || list.len() > MAX_ALIASES_PER_KEY {
                return Err(bad_param(
                    "aliases",
                    &format!("must list 1 to {MAX_ALIASES_PER_KEY} aliases"),
                ));
            }
            let aliases = list
                .iter()
                .map(|v| match v {
                    Value::String(s) => alias_field("aliases", s),
                    _ => Err(bad_param("aliases", "must be a list of strings")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            ks.delete_aliases(key, &aliases).map_err(kms)?;
            Ok(json!({}))
        }
        "associate-alias" => {
            let target = body.str_req("target_key_id")?;
            outcome.key = Some(target.to_string());
            let alias = alias_field("alias", body.str_req("alias")?)?;
            caller.check_id(ks, API, target, &["manage"], &none, outcome)?;
            // Moving an alias changes the key it leaves too: the caller must manage it as well.
            caller.check(ks, API, &alias, &["manage"], &none, outcome)?;
            let a = ks.associate_alias(&alias, target).map_err(kms)?;
            Ok(entity(&a, &domain))
        }
        other => Err(ApiError::new(
            API,
            axum::http::StatusCode::NOT_FOUND,
            "KMS.0201",
            format!(
                "unknown operation {:?}",
                other.chars().take(64).collect::<String>()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_becomes_a_body_of_strings() {
        let m = query_object(Some("key_id=alias%2Fa&limit=2&marker="));
        assert_eq!(m["key_id"], "alias/a");
        assert_eq!(m["limit"], "2");
        assert_eq!(m["marker"], "");
        assert!(query_object(None).is_empty());
        assert_eq!(query_object(Some("flag"))["flag"], "");
    }

    #[test]
    fn bad_aliases_are_refused_naming_the_field() {
        let e = alias_field("alias", "has space").unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("alias"), "{}", e.message);
        assert_eq!(alias_field("alias", "x").unwrap(), "alias/x");
    }
}
