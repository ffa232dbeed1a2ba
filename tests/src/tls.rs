//! Certificates a test makes for itself: a private CA, a server certificate
//! for `localhost` and `127.0.0.1`, and a client certificate for mutual TLS,
//! written as PEM files (what a cert-manager Secret or a managed service's
//! CA bundle gives an operator).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The PEM files of one test's private PKI.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate (what `--redis-ca-file` trusts).
    pub ca: PathBuf,
    /// The server's certificate.
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
    /// The client's certificate (mutual TLS).
    pub client_cert: PathBuf,
    /// The client's private key.
    pub client_key: PathBuf,
}

impl TestPki {
    /// Generates a CA and the two certificates it signs into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "sink test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let signed = |names: Vec<String>, purpose: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params.extended_key_usages = vec![purpose];
            let cert = params.signed_by(&key, &ca)?;
            anyhow::Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = signed(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) = signed(
            vec!["redis-sink".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;

        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem)?;
            anyhow::Ok(path)
        };
        // Keys readable by their owner only, as servers expect (stunnel
        // warns of anything more).
        let write_key = |name: &str, pem: &str| {
            use std::os::unix::fs::PermissionsExt;
            let path = write(name, pem)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            anyhow::Ok(path)
        };
        Ok(Self {
            ca: write("ca.pem", &ca.pem())?,
            server_cert: write("server.pem", &server_cert)?,
            server_key: write_key("server-key.pem", &server_key)?,
            client_cert: write("client.pem", &client_cert)?,
            client_key: write_key("client-key.pem", &client_key)?,
        })
    }
}
