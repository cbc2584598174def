//! Test certificates made at test time with rcgen: a CA, a server certificate for
//! 127.0.0.1/localhost, and client certificates (good, from another CA, expired), written as the
//! directories libnbd and qemu expect (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

pub struct Ca {
    pub cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = p.self_signed(&key).expect("self-sign CA");
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf certificate: (certificate PEM, key PEM).
    pub fn leaf(&self, cn: &str, sans: &[&str], server: bool, expired: bool) -> (String, String) {
        self.leaf_with_serial(cn, sans, server, expired, None)
    }

    /// [`Ca::leaf`] with a chosen serial number (for revocation lists).
    pub fn leaf_with_serial(
        &self,
        cn: &str,
        sans: &[&str],
        server: bool,
        expired: bool,
        serial: Option<u64>,
    ) -> (String, String) {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(sans).expect("leaf params");
        p.serial_number = serial.map(rcgen::SerialNumber::from);
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("sign leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// A certificate revocation list (PEM) of this CA revoking the certificates with `serials`.
    pub fn crl(&self, serials: &[u64]) -> String {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2025, 1, 1),
            next_update: rcgen::date_time_ymd(2035, 1, 1),
            crl_number: rcgen::SerialNumber::from(serials.len() as u64 + 1),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*s),
                    revocation_time: rcgen::date_time_ymd(2025, 6, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.cert, &self.key)
            .expect("sign CRL")
            .pem()
            .expect("CRL PEM")
    }

    /// Writes a server certificate and key under `dir` and returns their paths.
    pub fn server_files(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(
            "cryptnbd test server",
            &["127.0.0.1", "localhost"],
            true,
            false,
        );
        let c = dir.join(format!("{name}-cert.pem"));
        let k = dir.join(format!("{name}-key.pem"));
        std::fs::write(&c, cert).expect("write server cert");
        std::fs::write(&k, key).expect("write server key");
        (c, k)
    }

    /// Writes this CA's certificate to `dir/NAME.pem`.
    pub fn ca_file(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}.pem"));
        std::fs::write(&p, self.pem()).expect("write CA");
        p
    }
}

/// A libnbd/qemu client directory: `ca-cert.pem` (trusting `server_ca`), and a client certificate
/// with CN `cn` issued by `issuer` (or none).
pub fn client_dir(
    root: &Path,
    name: &str,
    server_ca: &Ca,
    client: Option<(&Ca, &str, bool)>,
) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).expect("client dir");
    std::fs::write(d.join("ca-cert.pem"), server_ca.pem()).expect("write ca-cert.pem");
    if let Some((issuer, cn, expired)) = client {
        let (cert, key) = issuer.leaf(cn, &[], false, expired);
        write_client(&d, &cert, &key);
    }
    d
}

/// Writes a client certificate and key into a client directory.
pub fn write_client(d: &Path, cert: &str, key: &str) {
    std::fs::write(d.join("client-cert.pem"), cert).expect("write client cert");
    std::fs::write(d.join("client-key.pem"), key).expect("write client key");
}
