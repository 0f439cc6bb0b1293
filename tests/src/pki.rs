//! Certificates made at run time (rcgen), so nothing checked in can expire.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA, a server certificate for 127.0.0.1 and `localhost`, a client certificate, and an unrelated
/// second CA, as PEM files in a temporary directory.
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).expect("write pem");
        let ca = make_ca("tether test CA");
        write("ca.pem", ca.pem());
        let other = make_ca("some other CA");
        write("other-ca.pem", other.pem());
        for (name, sans) in [
            ("server", vec!["localhost".to_string(), "127.0.0.1".to_string()]),
            ("client", vec!["client".to_string()]),
        ] {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("params");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, format!("tether test {name}"));
            let cert = params.signed_by(&key, &ca).expect("sign");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        TestPki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

fn make_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("self-signed CA")
}
