//! The DEW alias endpoints with raw HTTP requests (ureq) signed by the library's SDK-HMAC-SHA256
//! code: the shapes the SDK does not send — wrong methods, alias operation names used as
//! `kms/{operation}` verbs, malformed bodies and queries (400 naming the field) — and the list
//! answer as plain JSON (a one-element array, as the SDK parses it).

use crate::kms_http_support;

use kms_http_support::*;
use serde_json::{json, Value};

/// (method, query, body, expected code, the field the message must name).
type BadCase = (
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    &'static str,
    &'static str,
);

fn code(v: &Value) -> &str {
    v["error"]["error_code"].as_str().unwrap_or_default()
}

fn msg(v: &Value) -> &str {
    v["error"]["error_msg"].as_str().unwrap_or_default()
}

#[test]
fn alias_endpoints_refuse_bad_shapes_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    cli(dir.path(), &["kms", "init"]);
    cli(dir.path(), &["kms", "create-key", "--alias", "raw"]);
    let key = access_key(dir.path(), "raw-client", &["--admin"]);
    let server = KmsServer::start(dir.path(), &[]);
    let body = |v: Value| serde_json::to_vec(&v).unwrap();

    let (s, v) = signed_dew(
        &server,
        &key,
        "POST",
        "aliases",
        None,
        &body(json!({"key_id": "alias/raw", "alias": "alias/raw-2"})),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["alias"], "alias/raw-2");

    // The list answer is a one-element array holding the page.
    let (s, v) = signed_dew(
        &server,
        &key,
        "GET",
        "aliases",
        Some("key_id=alias%2Fraw&limit=1"),
        b"",
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v[0]["aliases"][0]["alias"], "alias/raw", "{v}");
    assert_eq!(v[0]["page_info"]["current_count"], 1, "{v}");
    assert_eq!(v[0]["page_info"]["next_marker"], "1", "{v}");

    // Wrong method, alias operations as verbs, unknown sub-paths.
    let (s, v) = signed_dew(&server, &key, "PUT", "aliases", None, b"{}");
    assert_eq!(s, 405, "{v}");
    let (s, v) = signed_dew(&server, &key, "GET", "alias/associate", None, b"");
    assert_eq!(s, 405, "{v}");
    for verb in [
        "create-alias",
        "list-aliases",
        "delete-alias",
        "associate-alias",
    ] {
        let (s, v) = signed_dew(&server, &key, "POST", verb, None, b"{}");
        assert_eq!((s, code(&v)), (404, "KMS.0201"), "{verb}: {v}");
    }
    let (s, v) = signed_dew(&server, &key, "POST", "alias/elsewhere", None, b"{}");
    assert_eq!(s, 404, "{v}");

    // Malformed bodies and queries: 400 naming the field.
    let cases: Vec<BadCase> = vec![
        ("POST", None, b"{not json".to_vec(), "KMS.0202", "JSON"),
        (
            "POST",
            None,
            body(json!({"key_id": "alias/raw", "alias": 7})),
            "KMS.0202",
            "alias",
        ),
        (
            "POST",
            None,
            body(json!({"key_id": "alias/raw", "alias": "alias/a b"})),
            "KMS.0203",
            "alias",
        ),
        (
            "DELETE",
            None,
            body(json!({"key_id": "alias/raw", "aliases": "alias/raw-2"})),
            "KMS.0203",
            "aliases",
        ),
        (
            "DELETE",
            None,
            body(json!({"key_id": "alias/raw", "aliases": []})),
            "KMS.0203",
            "aliases",
        ),
        (
            "DELETE",
            None,
            body(json!({"key_id": "alias/raw", "aliases": [1]})),
            "KMS.0203",
            "aliases",
        ),
        ("GET", Some("limit=abc"), vec![], "KMS.0203", "limit"),
        ("GET", Some("limit=1001"), vec![], "KMS.0203", "limit"),
        ("GET", Some("marker=zz"), vec![], "KMS.0203", "marker"),
    ];
    for (method, query, b, want, field) in cases {
        let (s, v) = signed_dew(&server, &key, method, "aliases", query, &b);
        assert_eq!((s, code(&v)), (400, want), "{method} {query:?}: {v}");
        assert!(msg(&v).contains(field), "{field} named: {v}");
    }
    let (s, v) = signed_dew(
        &server,
        &key,
        "POST",
        "alias/associate",
        None,
        &body(json!({"alias": "alias/raw-2"})),
    );
    assert_eq!((s, code(&v)), (400, "KMS.0204"), "{v}");
    assert!(msg(&v).contains("target_key_id"), "{v}");

    // Nothing changed by the refusals; the store is sound.
    let (_, v) = signed_dew(&server, &key, "GET", "aliases", None, b"");
    assert_eq!(v[0]["page_info"]["current_count"], 2, "{v}");
    cli(dir.path(), &["check"]);
    let audit = audit_text(dir.path());
    assert!(
        audit.contains(r#""operation":"http create-alias""#),
        "{audit}"
    );
    assert!(audit.contains(r#""operation":"http aliases""#), "{audit}");
}
