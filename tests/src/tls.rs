//! A throwaway certificate authority for TLS tests: a CA and a `localhost` / `127.0.0.1` leaf
//! certificate it signed, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

pub struct TestCa {
    pub ca_cert_path: PathBuf,
    pub ca_cert_pem: String,
    pub leaf_cert_path: PathBuf,
    pub leaf_key_path: PathBuf,
    pub leaf_cert_pem: String,
    pub leaf_key_pem: String,
}

impl TestCa {
    /// Creates the CA and leaf and writes them under `dir`.
    pub fn create(dir: &Path) -> Result<Self, Box<dyn std::error::Error>> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tokn test CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate()?;
        let mut leaf_params = CertificateParams::new(vec!["localhost".to_owned()])?;
        leaf_params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer)?;

        std::fs::create_dir_all(dir)?;
        let ca_cert_path = dir.join("ca.pem");
        let leaf_cert_path = dir.join("leaf.pem");
        let leaf_key_path = dir.join("leaf.key");
        std::fs::write(&ca_cert_path, ca_cert.pem())?;
        std::fs::write(&leaf_cert_path, leaf_cert.pem())?;
        std::fs::write(&leaf_key_path, leaf_key.serialize_pem())?;
        Ok(Self {
            ca_cert_path,
            ca_cert_pem: ca_cert.pem(),
            leaf_cert_path,
            leaf_key_path,
            leaf_cert_pem: leaf_cert.pem(),
            leaf_key_pem: leaf_key.serialize_pem(),
        })
    }
}
