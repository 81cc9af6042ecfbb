//! The etcd store against etcd as it is run in production: TLS on the
//! client port with client certificates required (`--client-cert-auth`),
//! and authentication enabled (`auth enable`, a user whose role may read
//! and write rekeyd's prefix only). Certificates are made by the test
//! (rcgen); etcd is the real server (`etcd` on PATH).
//!
//! A good setup stores and claims; a wrong CA, a missing client
//! certificate, a wrong password and a missing user each fail with an error
//! that names the setting to fix.

#[path = "support/etcd.rs"]
mod etcd;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use etcd::{EtcdServer, ServerTls};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rekeyd::config::{Config, ConfigError, EtcdStoreConfig, StoreConfig};
use rekeyd::store::etcd::EtcdStore;
use rekeyd::store::{CredentialRecord, SecretEntry, Store, StoreError};
use secrecy::{ExposeSecret, SecretString};

const PREFIX: &str = "/rekeyd-secured";

/// A CA, and PEM files of certificates it signs, in `dir`.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    name: &'static str,
}

impl Ca {
    fn new(dir: &Path, name: &'static str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("rekeyd test {name}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), issuer.pem()).unwrap();
        Ca {
            issuer,
            dir: dir.to_path_buf(),
            name,
        }
    }

    fn cert_path(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// Writes `<file>.pem` and `<file>.key` (mode 0600) for a certificate
    /// for `usage` naming `sans`; returns their paths.
    fn issue(
        &self,
        file: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        rekeyd::fsutil::write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600).unwrap();
        (cert_path, key_path)
    }
}

/// The `[store]` a configuration with `keys` validates to, through the
/// same path as `rekeyd run` (files read, modes checked).
fn store_config(keys: &str) -> Result<EtcdStoreConfig, ConfigError> {
    let text = format!(
        "[store]\nkind = \"etcd\"\nprefix = \"{PREFIX}\"\n{keys}\n\
         [[credentials]]\nname = \"a\"\nprovider = \"oauth2\"\nclient_id = \"c\"\n\
         initial_secret_file = \"/etc/rekeyd/a.secret\"\n\
         [credentials.endpoints]\ntoken_url = \"https://idp.example/token\"\n"
    );
    match Config::from_toml(&text)?.store {
        StoreConfig::Etcd(etcd) => Ok(etcd),
        other => panic!("not an etcd store: {other:?}"),
    }
}

fn record(value: &str) -> CredentialRecord {
    CredentialRecord::new(SecretEntry {
        id: Some("id1".into()),
        value: SecretString::from(value),
        created_at: SystemTime::UNIX_EPOCH,
        expires_at: None,
    })
}

/// Stores, reads back and claims through `store`.
async fn stores_and_claims(store: &EtcdStore) {
    store.check_writable("maps").await.unwrap();
    let version = store
        .compare_and_swap("maps", None, &record("s3cr3t"))
        .await
        .unwrap();
    let got = store.load("maps").await.unwrap().expect("stored");
    assert_eq!(got.version, version);
    assert_eq!(got.value.current.value.expose_secret(), "s3cr3t");
    let claim = tokio::time::timeout(Duration::from_secs(10), store.claim("maps", false))
        .await
        .expect("claim in time")
        .unwrap()
        .expect("nobody else holds it");
    assert!(claim.is_fresh());
    drop(claim);
}

/// The error of connecting with `config`, as the operator reads it.
async fn connect_error(config: &EtcdStoreConfig) -> String {
    match EtcdStore::connect(config).await {
        Ok(_) => panic!("connected"),
        Err(e @ StoreError::Unavailable { .. }) => {
            eprintln!("connect failed as expected: {e}");
            e.to_string()
        }
        Err(e) => panic!("not an unavailable store: {e}"),
    }
}

#[tokio::test]
async fn tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "ca");
    let (server_cert, server_key) = ca.issue(
        "server",
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = ca.issue("client", &[], ExtendedKeyUsagePurpose::ClientAuth);
    let Some(server) = EtcdServer::start_tls(&ServerTls {
        cert: server_cert,
        key: server_key,
        client_ca: Some(ca.cert_path()),
    }) else {
        return;
    };
    let endpoint = format!("endpoints = [\"{}\"]", server.endpoint);
    assert!(server.endpoint.starts_with("https://"));

    // The whole setup: stores and claims.
    let good = store_config(&format!(
        "{endpoint}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        ca.cert_path().display(),
        client_cert.display(),
        client_key.display()
    ))
    .unwrap();
    let debug = format!("{good:?}");
    assert!(
        !debug.contains("PRIVATE KEY") && debug.contains("[redacted]"),
        "{debug}"
    );
    let store = EtcdStore::connect(&good).await.expect("connects over TLS");
    stores_and_claims(&store).await;

    // A CA that did not sign the server's certificate.
    let other = Ca::new(d, "other-ca");
    let mut wrong_ca = good.clone();
    wrong_ca.tls.as_mut().unwrap().ca_pem = std::fs::read(other.cert_path()).unwrap();
    let err = connect_error(&wrong_ca).await;
    assert!(
        err.contains("not signed by the CA in store.ca_file"),
        "wrong CA: {err}\n{}",
        server.log()
    );

    // No client certificate for a server that requires one.
    let mut anonymous = good.clone();
    anonymous.tls.as_mut().unwrap().client = None;
    let err = connect_error(&anonymous).await;
    assert!(
        err.contains("store.cert_file and store.key_file"),
        "no client certificate: {err}\n{}",
        server.log()
    );

    // A client certificate the server's CA did not sign.
    let (stranger_cert, stranger_key) =
        other.issue("stranger", &[], ExtendedKeyUsagePurpose::ClientAuth);
    let stranger = store_config(&format!(
        "{endpoint}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        ca.cert_path().display(),
        stranger_cert.display(),
        stranger_key.display()
    ))
    .unwrap();
    let err = connect_error(&stranger).await;
    assert!(
        err.contains("client certificate in store.cert_file"),
        "foreign client certificate: {err}\n{}",
        server.log()
    );

    // https without a CA: the configuration names the key it needs.
    let err = store_config(&endpoint).unwrap_err().to_string();
    assert!(err.contains("`store.ca_file`"), "{err}");

    // A key readable by all users is refused before use (I7).
    std::fs::set_permissions(
        &client_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let err = store_config(&format!(
        "{endpoint}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        ca.cert_path().display(),
        client_cert.display(),
        client_key.display()
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`store.key_file`") && err.contains("accessible to all users"),
        "{err}"
    );
}

/// `etcdctl user add root; role add ...; auth enable`, through the client
/// API: root, and user `rekeyd` whose role reads and writes `PREFIX/`.
async fn enable_auth(endpoint: &str, password: &str) {
    let mut client = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    client
        .user_add("root", "root-password", None)
        .await
        .unwrap();
    client.user_grant_role("root", "root").await.unwrap();
    client.role_add("rekeyd").await.unwrap();
    client
        .role_grant_permission(
            "rekeyd",
            etcd_client::Permission::read_write(format!("{PREFIX}/")).with_prefix(),
        )
        .await
        .unwrap();
    // The start-up probe reads the prefix key itself.
    client
        .role_grant_permission("rekeyd", etcd_client::Permission::read(PREFIX))
        .await
        .unwrap();
    client.user_add("rekeyd", password, None).await.unwrap();
    client.user_grant_role("rekeyd", "rekeyd").await.unwrap();
    client.auth_enable().await.unwrap();
}

#[tokio::test]
async fn authentication_with_a_password_file() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    const PASSWORD: &str = "pa55-w0rd-of-rekeyd";
    enable_auth(&server.endpoint, PASSWORD).await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("etcd.password");
    rekeyd::fsutil::write_atomic(&password_file, format!("{PASSWORD}\n").as_bytes(), 0o600)
        .unwrap();
    let endpoint = format!("endpoints = [\"{}\"]", server.endpoint);
    let with_user = |user: &str| {
        format!(
            "{endpoint}\nusername = \"{user}\"\npassword_file = \"{}\"",
            password_file.display()
        )
    };

    let good = store_config(&with_user("rekeyd")).unwrap();
    let debug = format!("{good:?}");
    assert!(!debug.contains(PASSWORD), "{debug}");
    let store = EtcdStore::connect(&good).await.expect("signs in");
    stores_and_claims(&store).await;

    // A wrong password: etcd refuses, the error names the user and the key.
    let wrong_file = dir.path().join("wrong.password");
    rekeyd::fsutil::write_atomic(&wrong_file, b"not-the-password\n", 0o600).unwrap();
    let wrong = store_config(&format!(
        "{endpoint}\nusername = \"rekeyd\"\npassword_file = \"{}\"",
        wrong_file.display()
    ))
    .unwrap();
    let err = connect_error(&wrong).await;
    assert!(
        err.contains("refused user \"rekeyd\"") && err.contains("store.password_file"),
        "wrong password: {err}"
    );
    assert!(!err.contains("not-the-password") && !err.contains(PASSWORD));

    // No user at all against a cluster with authentication.
    let anonymous = store_config(&endpoint).unwrap();
    let err = connect_error(&anonymous).await;
    assert!(
        err.contains("set store.username and store.password_file"),
        "no user: {err}"
    );

    // A user whose role does not cover the prefix.
    let other = EtcdStoreConfig {
        prefix: "/elsewhere".to_string(),
        ..good.clone()
    };
    let err = connect_error(&other).await;
    assert!(
        err.contains("lacks read-write access to the keys under /elsewhere"),
        "no permission: {err}"
    );

    // A password file readable by all users is refused (I7), naming the key.
    let password_file = dir.path().join("open.password");
    rekeyd::fsutil::write_atomic(&password_file, PASSWORD.as_bytes(), 0o600).unwrap();
    std::fs::set_permissions(
        &password_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let err = store_config(&format!(
        "{endpoint}\nusername = \"rekeyd\"\npassword_file = \"{}\"",
        password_file.display()
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`store.password_file`") && err.contains("accessible to all users"),
        "{err}"
    );
}

/// Over plain http to a host beyond this one, the password can be read on
/// the network: a warning names the key (loopback, as in the test above,
/// is not warned about).
#[test]
fn a_password_over_plain_http_beyond_the_host_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("etcd.password");
    rekeyd::fsutil::write_atomic(&password_file, b"pw\n", 0o600).unwrap();
    let warnings = |endpoint: &str| {
        Config::from_toml(&format!(
            "[store]\nkind = \"etcd\"\nendpoints = [\"{endpoint}\"]\nusername = \"rekeyd\"\n\
             password_file = \"{}\"\n[[credentials]]\nname = \"a\"\nprovider = \"oauth2\"\n\
             client_id = \"c\"\ninitial_secret_file = \"/etc/rekeyd/a.secret\"\n\
             [credentials.endpoints]\ntoken_url = \"https://idp.example/token\"\n",
            password_file.display()
        ))
        .unwrap()
        .warnings()
    };
    let remote = warnings("http://10.0.0.1:2379");
    assert!(
        remote
            .iter()
            .any(|w| w.key == "store.password_file" && w.reason.contains("unencrypted")),
        "{remote:?}"
    );
    assert!(warnings("http://127.0.0.1:2379").is_empty());
}
