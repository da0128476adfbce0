//! TLS on the public listener: rustls with the certificate and key read from
//! PEM files, re-read when either file changes (certificate rotation without
//! a restart). Connections are accepted by [`crate::listener`], like plain ones.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::shutdown::Stop;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {0}: {1}")]
    Cert(String, String),
    #[error("cannot read key file {0}: {1}")]
    Key(String, String),
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

/// Loads a certificate chain and its private key into a signing identity.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = read_certificates(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Key(key.display().to_string(), e.to_string()))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der)
        .map_err(|e| TlsError::Key(key.display().to_string(), e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    // A key that is not the certificate's would load and then fail every
    // handshake (a rotation that replaced one file of the pair, say).
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(_) => Err(TlsError::Key(
            key.display().to_string(),
            format!(
                "not the private key of the certificate in {}",
                cert.display()
            ),
        )),
    }
}

/// Installs aws-lc-rs as the process-wide rustls provider, once. Our own
/// configs name their provider; the redis client's TLS uses the process
/// default, which rustls cannot pick by itself when another dependency
/// enables its `ring` feature too.
pub fn install_default_provider() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // Err: one is installed already (whoever did it first keeps it).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// Every certificate of a PEM file; at least one.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Cert(path.display().to_string(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Cert(
            path.display().to_string(),
            "no certificate in the file".into(),
        ));
    }
    Ok(certs)
}

/// Serves whatever certificate was loaded last.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ReloadingCert {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<ReloadingCert>, TlsError> {
        let key = load_certified_key(cert_file, key_file)?;
        Ok(Arc::new(ReloadingCert {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: ArcSwap::from_pointee(key),
        }))
    }

    /// Re-reads both files when either changes; a broken pair is logged and
    /// the current certificate keeps serving.
    pub async fn watch(self: Arc<Self>, poll: Duration, stop: Stop) {
        let fingerprint = |this: &ReloadingCert| {
            (
                std::fs::read(&this.cert_file).ok(),
                std::fs::read(&this.key_file).ok(),
            )
        };
        let mut seen = fingerprint(&self);
        while !stop.sleep(poll).await {
            let now = fingerprint(&self);
            if now == seen {
                continue;
            }
            seen = now;
            match load_certified_key(&self.cert_file, &self.key_file) {
                Ok(key) => {
                    self.current.store(Arc::new(key));
                    tracing::info!(cert = %self.cert_file.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate reload refused; the current one stays")
                }
            }
        }
    }

    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key, as PEM files in a fresh folder.
    fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gw.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_file, key_file) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("toastgate-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert_a, key_a) = pair(&dir, "a");
        let (_, key_b) = pair(&dir, "b");
        assert!(load_certified_key(&cert_a, &key_a).is_ok());
        let e = load_certified_key(&cert_a, &key_b).unwrap_err().to_string();
        assert!(e.contains("not the private key of the certificate"), "{e}");
        assert!(ReloadingCert::load(&cert_a, &key_b).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
