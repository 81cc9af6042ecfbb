//! A client's signing key for `private_key_jwt` (RFC 7523 §2.2, OpenID
//! Connect Core §9): read from a PEM or JWK file, kept as a private JWK
//! (RFC 7517) and used to sign client assertions.
//!
//! The store keeps the key where a client secret would be: its
//! [`SecretEntry`](crate::store::SecretEntry) value is the private JWK as
//! JSON ([`ClientKey::to_secret`]), so the store, the journal, file mode
//! 0600, the redacted `Debug` and the log scan apply to keys unchanged.
//!
//! Supported keys and the JWS algorithm each signs with (RFC 7518 §3,
//! RFC 8037 §3.1); the algorithm follows from the key, never from input:
//!
//! | key          | `kty` / `crv`   | `alg`   |
//! |--------------|-----------------|---------|
//! | EC P-256     | `EC` / `P-256`  | `ES256` |
//! | RSA ≥ 2048 b | `RSA`           | `RS256` |
//! | Ed25519      | `OKP` / `Ed25519` | `EdDSA` |
//!
//! Signing is aws-lc-rs's (the library rustls already uses here). No error
//! of this module quotes key material: they name the format problem only.

use std::fmt;

use aws_lc_rs::encoding::AsBigEndian;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeyPairComponents, PublicKeyComponents};
use aws_lc_rs::signature::{
    self, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a key could not be used. Never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text is not a supported private key; the reason names the
    /// format problem (a PEM label, a missing JWK member), not the content.
    #[error("{0}")]
    Format(String),
    /// The signing library refused to sign (should not happen with a key
    /// it accepted).
    #[error("signing failed")]
    Sign,
}

fn format(reason: impl Into<String>) -> KeyError {
    KeyError::Format(reason.into())
}

/// A JWS signature algorithm rekeyd signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Es256,
    Rs256,
    EdDsa,
}

impl Alg {
    /// The `alg` header value (RFC 7518 §3.1, RFC 8037 §3.1).
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::Es256 => "ES256",
            Alg::Rs256 => "RS256",
            Alg::EdDsa => "EdDSA",
        }
    }
}

/// A JWK's members as rekeyd reads and writes them (RFC 7517 §4, RFC 7518
/// §6.2 and §6.3, RFC 8037 §2). Byte values are base64url without padding.
#[derive(Default, Serialize, Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    q: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dq: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    qi: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alg: Option<String>,
}

enum Signer {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
    Ed(Ed25519KeyPair),
}

/// A private key with its key id. `Debug` shows the key type, `alg` and
/// `kid` only (the `kid` is public: it names the key to the server).
pub struct ClientKey {
    jwk: Jwk,
    kid: String,
    alg: Alg,
    signer: Signer,
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("kty", &self.jwk.kty)
            .field("alg", &self.alg.as_str())
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn member<'a>(jwk: &'a Jwk, value: &'a Option<String>, name: &str) -> Result<Vec<u8>, KeyError> {
    let text = value.as_deref().ok_or_else(|| {
        format(format!(
            "the {} JWK has no {name:?} member{}",
            jwk.kty,
            if name == "d" {
                " (a public key: rekeyd needs the private key)"
            } else {
                ""
            }
        ))
    })?;
    B64.decode(text)
        .map_err(|_| format(format!("the JWK member {name:?} is not base64url")))
}

fn b64(bytes: &[u8]) -> Option<String> {
    Some(B64.encode(bytes))
}

/// Big-endian bytes without leading zeros (RFC 7518 §2 "Base64urlUInt").
fn uint(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

impl ClientKey {
    /// Reads a bootstrap key file: PEM (`PRIVATE KEY`, i.e. PKCS#8, for EC
    /// P-256, RSA or Ed25519; `EC PRIVATE KEY`, SEC 1; `RSA PRIVATE KEY`,
    /// PKCS#1) or one private JWK as JSON. A JWK's `kid` is kept; any other
    /// key gets its RFC 7638 thumbprint as `kid`.
    ///
    /// # Errors
    /// [`KeyError::Format`] naming the problem (an encrypted or unknown PEM
    /// block, a public key, an unsupported curve), never the content.
    pub fn from_file_text(text: &str) -> Result<ClientKey, KeyError> {
        let trimmed = text.trim();
        if trimmed.starts_with('{') {
            return ClientKey::from_jwk_json(trimmed);
        }
        if !trimmed.starts_with("-----BEGIN ") {
            return Err(format(
                "is neither PEM (-----BEGIN PRIVATE KEY-----) nor a JWK (JSON object)",
            ));
        }
        let block = pem::parse(trimmed)
            .map_err(|e| format(format!("is not valid PEM ({})", pem_problem(&e))))?;
        // RFC 1421 §4.6.1.1: OpenSSL's legacy encrypted `EC/RSA PRIVATE
        // KEY` keeps its label and says so in a header.
        if block
            .headers()
            .get("Proc-Type")
            .is_some_and(|t| t.contains("ENCRYPTED"))
        {
            return Err(format(
                "is an encrypted private key; rekeyd needs it unencrypted (e.g. openssl pkcs8 -topk8 -nocrypt)",
            ));
        }
        let der = block.contents();
        let jwk = match block.tag() {
            "PRIVATE KEY" => pkcs8_to_jwk(der)?,
            "EC PRIVATE KEY" => {
                let pair =
                    EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                        .map_err(|_| format("is not an EC P-256 private key (SEC 1)"))?;
                ec_jwk(&pair)?
            }
            "RSA PRIVATE KEY" => rsa_jwk(der)?,
            "ENCRYPTED PRIVATE KEY" => {
                return Err(format(
                    "is an encrypted private key; rekeyd needs it unencrypted (e.g. openssl pkcs8 -topk8 -nocrypt)",
                ));
            }
            "PUBLIC KEY" | "CERTIFICATE" => {
                return Err(format(format!(
                    "holds a {}; rekeyd needs the private key",
                    block.tag()
                )));
            }
            other => {
                return Err(format(format!(
                    "holds a PEM block labelled {:?}; expected PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY",
                    crate::provider::redact::printable(other, 40)
                )));
            }
        };
        ClientKey::from_jwk(jwk)
    }

    /// A private JWK as JSON: a bootstrap file, or the store's value.
    ///
    /// # Errors
    /// [`KeyError::Format`] for JSON that is not one private JWK of a
    /// supported type (the reason never quotes the text).
    pub fn from_jwk_json(text: &str) -> Result<ClientKey, KeyError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            // serde_json's own message may quote a value; its position may not.
            format(format!(
                "is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        if value.get("keys").is_some() {
            return Err(format(
                "is a JWK set; give one private key (a JSON object with \"kty\")",
            ));
        }
        let jwk: Jwk = serde_json::from_value(value).map_err(|_| {
            format("is not a JWK (a JSON object with string members, \"kty\" among them)")
        })?;
        ClientKey::from_jwk(jwk)
    }

    fn from_jwk(mut jwk: Jwk) -> Result<ClientKey, KeyError> {
        let (alg, signer) = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
            ("EC", Some("P-256")) => {
                let mut point = vec![0x04];
                let x = member(&jwk, &jwk.x, "x")?;
                let y = member(&jwk, &jwk.y, "y")?;
                if x.len() != 32 || y.len() != 32 {
                    return Err(format("the P-256 JWK's x and y must be 32 bytes each"));
                }
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                let d = member(&jwk, &jwk.d, "d")?;
                let pair = EcdsaKeyPair::from_private_key_and_public_key(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    &d,
                    &point,
                )
                .map_err(|_| format("the P-256 JWK's d, x and y do not form a key pair"))?;
                (Alg::Es256, Signer::Ec(pair))
            }
            ("EC", _) => {
                return Err(format(
                    "is an EC key on a curve other than P-256 (ES256 is supported)",
                ));
            }
            ("RSA", _) => {
                let n = member(&jwk, &jwk.n, "n")?;
                let e = member(&jwk, &jwk.e, "e")?;
                let d = member(&jwk, &jwk.d, "d")?;
                let p = member(&jwk, &jwk.p, "p")?;
                let q = member(&jwk, &jwk.q, "q")?;
                let dp = member(&jwk, &jwk.dp, "dp")?;
                let dq = member(&jwk, &jwk.dq, "dq")?;
                let qi = member(&jwk, &jwk.qi, "qi")?;
                let components = KeyPairComponents {
                    public_key: PublicKeyComponents {
                        n: uint(&n),
                        e: uint(&e),
                    },
                    d: &d[..],
                    p: &p[..],
                    q: &q[..],
                    dP: &dp[..],
                    dQ: &dq[..],
                    qInv: &qi[..],
                };
                let pair = RsaKeyPair::from_components(&components).map_err(|_| {
                    format(
                        "the RSA JWK's members do not form a valid two-prime key of 2048 to 8192 bits",
                    )
                })?;
                (Alg::Rs256, Signer::Rsa(pair))
            }
            ("OKP", Some("Ed25519")) => {
                let x = member(&jwk, &jwk.x, "x")?;
                let d = member(&jwk, &jwk.d, "d")?;
                let pair = Ed25519KeyPair::from_seed_and_public_key(&d, &x)
                    .map_err(|_| format("the Ed25519 JWK's d and x do not form a key pair"))?;
                (Alg::EdDsa, Signer::Ed(pair))
            }
            ("OKP", _) => {
                return Err(format(
                    "is an OKP key on a curve other than Ed25519 (EdDSA with Ed25519 is supported)",
                ));
            }
            _ => {
                return Err(format(
                    "has a key type other than EC (P-256), RSA or OKP (Ed25519)",
                ));
            }
        };
        // RFC 7517 §4.4: a JWK's `alg` restricts the key to that algorithm.
        if let Some(given) = jwk.alg.as_deref()
            && given != alg.as_str()
        {
            return Err(format(format!(
                "says alg {:?}, but rekeyd signs with {} for this key type",
                crate::provider::redact::printable(given, 20),
                alg.as_str()
            )));
        }
        jwk.alg = Some(alg.as_str().to_string());
        let kid = match jwk.kid.as_deref() {
            Some(kid) if !kid.is_empty() => kid.to_string(),
            _ => canonical_thumbprint(&jwk),
        };
        jwk.kid = Some(kid.clone());
        Ok(ClientKey {
            jwk,
            kid,
            alg,
            signer,
        })
    }

    /// The key id: the source JWK's `kid`, else the RFC 7638 thumbprint.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm this key signs with.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// The private JWK as JSON (with `kid` and `alg`): the value the store
    /// keeps for the credential.
    pub fn to_secret(&self) -> SecretString {
        SecretString::from(serde_json::to_string(&self.jwk).expect("a JWK serializes"))
    }

    /// The public JWK (no private members) with `kid`, `alg` and
    /// `use = "sig"`: what a server registers (`jwks`) or fetches
    /// (`jwks_uri`).
    pub fn public_jwk(&self) -> serde_json::Value {
        let mut public = serde_json::to_value(Jwk {
            kty: self.jwk.kty.clone(),
            crv: self.jwk.crv.clone(),
            x: self.jwk.x.clone(),
            y: self.jwk.y.clone(),
            n: self.jwk.n.clone(),
            e: self.jwk.e.clone(),
            kid: self.jwk.kid.clone(),
            alg: self.jwk.alg.clone(),
            ..Jwk::default()
        })
        .expect("a JWK serializes");
        public["use"] = "sig".into();
        public
    }

    /// The RFC 7638 thumbprint of the key (SHA-256, base64url): the id
    /// the journal and every key publisher name it by (the `kid` is only
    /// the hint in an assertion's header, RFC 7515 §4.1.4, and equals the
    /// thumbprint for every key rekeyd generates).
    pub fn thumbprint(&self) -> String {
        canonical_thumbprint(&self.jwk)
    }

    /// Signs `message` (a JWS signing input) with [`ClientKey::alg`]: the
    /// JWS signature bytes (ES256: `r || s`, 64 bytes, RFC 7518 §3.4).
    ///
    /// # Errors
    /// [`KeyError::Sign`] if the library fails.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rng = SystemRandom::new();
        match &self.signer {
            Signer::Ec(pair) => pair
                .sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError::Sign),
            Signer::Rsa(pair) => {
                let mut out = vec![0; pair.public_modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut out)
                    .map_err(|_| KeyError::Sign)?;
                Ok(out)
            }
            Signer::Ed(pair) => Ok(pair.sign(message).as_ref().to_vec()),
        }
    }
}

/// The RFC 7638 thumbprint of a published public JWK, whatever its `kid`
/// says: which key it is, and the id rekeyd names a published key by (a
/// server may drop or rewrite a `kid`, or re-encode the members, never
/// change the key). `None` for a member rekeyd cannot read (it is then
/// nobody's to touch).
pub fn public_thumbprint(jwk: &serde_json::Value) -> Option<String> {
    let parsed: Jwk = serde_json::from_value(jwk.clone()).ok()?;
    canonical_public(&parsed).map(|canonical| thumbprint(&canonical))
}

/// The thumbprint of a key read from a file or the store: of its public
/// members in canonical form, so that it equals [`public_thumbprint`] of
/// the key as any server shows it.
fn canonical_thumbprint(jwk: &Jwk) -> String {
    canonical_public(jwk)
        .as_ref()
        .map_or_else(|| thumbprint(jwk), thumbprint)
}

/// The public members of `jwk` in the form RFC 7638 §3.3 hashes:
/// base64url without padding, RSA integers without leading zero octets
/// (RFC 7518 §6.3.1), EC coordinates of the curve's full size (RFC 7518
/// §6.2.1.2). A server that stores a key re-encoded (padding, the standard
/// alphabet, a sign octet before `n`) still shows the same key. `None`
/// when a member is missing or not base64.
fn canonical_public(jwk: &Jwk) -> Option<Jwk> {
    let bytes = |member: &Option<String>| -> Option<Vec<u8>> {
        let text = member.as_deref()?.trim_end_matches('=');
        B64.decode(text.replace('+', "-").replace('/', "_")).ok()
    };
    let uint_member = |member: &Option<String>| b64(uint(&bytes(member)?));
    let coordinate = |member: &Option<String>, size: usize| -> Option<String> {
        let value = bytes(member)?;
        let significant = uint(&value);
        (significant.len() <= size).then(|| {
            let mut full = vec![0; size - significant.len()];
            full.extend_from_slice(significant);
            B64.encode(full)
        })
    };
    let mut public = Jwk {
        kty: jwk.kty.clone(),
        ..Jwk::default()
    };
    match jwk.kty.as_str() {
        "RSA" => {
            public.n = Some(uint_member(&jwk.n)?);
            public.e = Some(uint_member(&jwk.e)?);
        }
        "EC" => {
            let size = match jwk.crv.as_deref()? {
                "P-256" => 32,
                "P-384" => 48,
                "P-521" => 66,
                _ => return None,
            };
            public.crv = jwk.crv.clone();
            public.x = Some(coordinate(&jwk.x, size)?);
            public.y = Some(coordinate(&jwk.y, size)?);
        }
        "OKP" => {
            public.crv = Some(jwk.crv.clone()?);
            public.x = Some(B64.encode(bytes(&jwk.x)?));
        }
        _ => return None,
    }
    Some(public)
}

/// Reads the key the store holds for a credential (its private JWK).
///
/// # Errors
/// As [`ClientKey::from_jwk_json`].
pub fn from_secret(secret: &SecretString) -> Result<ClientKey, KeyError> {
    ClientKey::from_jwk_json(secret.expose_secret())
}

/// RFC 7638 §3.2: the required members only, in lexicographic order,
/// without whitespace; RFC 8037 §2 for OKP.
fn thumbprint(jwk: &Jwk) -> String {
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    let canonical = match jwk.kty.as_str() {
        "EC" => {
            serde_json::json!({"crv": s(&jwk.crv), "kty": "EC", "x": s(&jwk.x), "y": s(&jwk.y)})
        }
        "RSA" => serde_json::json!({"e": s(&jwk.e), "kty": "RSA", "n": s(&jwk.n)}),
        _ => {
            serde_json::json!({"crv": s(&jwk.crv), "kty": s(&Some(jwk.kty.clone())), "x": s(&jwk.x)})
        }
    };
    // serde_json's map is ordered by key (no preserve_order feature) and
    // writes no whitespace.
    let text = serde_json::to_string(&canonical).expect("JSON serializes");
    B64.encode(Sha256::digest(text.as_bytes()))
}

fn pem_problem(e: &pem::PemError) -> &'static str {
    match e {
        pem::PemError::MismatchedTags(..) => "its BEGIN and END labels differ",
        pem::PemError::MalformedFraming => "malformed BEGIN/END lines",
        pem::PemError::MissingBeginTag | pem::PemError::MissingEndTag => {
            "a BEGIN or END line is missing"
        }
        pem::PemError::MissingData => "no data between BEGIN and END",
        pem::PemError::InvalidData(_) => "the data is not base64",
        _ => "unreadable",
    }
}

const OID_EC: pkcs8::ObjectIdentifier = pkcs8::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_RSA: pkcs8::ObjectIdentifier =
    pkcs8::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_ED25519: pkcs8::ObjectIdentifier = pkcs8::ObjectIdentifier::new_unwrap("1.3.101.112");

/// A PKCS#8 `PrivateKeyInfo` (RFC 5208, RFC 5958) as a private JWK.
fn pkcs8_to_jwk(der: &[u8]) -> Result<Jwk, KeyError> {
    let info = pkcs8::PrivateKeyInfo::try_from(der)
        .map_err(|_| format("is not a PKCS#8 private key (PRIVATE KEY block)"))?;
    let oid = info.algorithm.oid;
    if oid == OID_EC {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| format("is an EC key, but not on P-256 (ES256 is supported)"))?;
        ec_jwk(&pair)
    } else if oid == OID_RSA {
        rsa_jwk(info.private_key)
    } else if oid == OID_ED25519 {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|_| format("is not a valid Ed25519 PKCS#8 key"))?;
        let seed = pair
            .seed()
            .and_then(|s| s.as_be_bytes())
            .map_err(|_| format("is not a valid Ed25519 PKCS#8 key"))?;
        Ok(Jwk {
            kty: "OKP".into(),
            crv: Some("Ed25519".into()),
            x: b64(pair.public_key().as_ref()),
            d: b64(seed.as_ref()),
            ..Jwk::default()
        })
    } else {
        Err(format(
            "is a PKCS#8 key of a type other than EC P-256, RSA or Ed25519",
        ))
    }
}

fn ec_jwk(pair: &EcdsaKeyPair) -> Result<Jwk, KeyError> {
    // The uncompressed point: 0x04 || x || y (SEC 1 §2.3.3).
    let point = pair.public_key().as_ref();
    let d = pair
        .private_key()
        .as_be_bytes()
        .map_err(|_| format("is not a usable EC P-256 key"))?;
    Ok(Jwk {
        kty: "EC".into(),
        crv: Some("P-256".into()),
        x: b64(&point[1..33]),
        y: b64(&point[33..65]),
        d: b64(d.as_ref()),
        ..Jwk::default()
    })
}

/// A PKCS#1 `RSAPrivateKey` (RFC 8017 §A.1.2) as a private JWK.
fn rsa_jwk(der: &[u8]) -> Result<Jwk, KeyError> {
    let key = pkcs1::RsaPrivateKey::try_from(der)
        .map_err(|_| format("is not a PKCS#1 RSA private key"))?;
    if key.other_prime_infos.is_some() {
        return Err(format(
            "is a multi-prime RSA key (two primes are supported)",
        ));
    }
    let u = |v: pkcs1::UintRef<'_>| b64(uint(v.as_bytes()));
    Ok(Jwk {
        kty: "RSA".into(),
        n: u(key.modulus),
        e: u(key.public_exponent),
        d: u(key.private_exponent),
        p: u(key.prime1),
        q: u(key.prime2),
        dp: u(key.exponent1),
        dq: u(key.exponent2),
        qi: u(key.coefficient),
        ..Jwk::default()
    })
}

/// A new key pair of the type that signs with `alg` (RSA: 2048 bits),
/// from the operating system's CSPRNG: the next key of a key rotation.
/// Its `kid` is its RFC 7638 thumbprint.
///
/// # Errors
/// [`KeyError::Sign`] if the library cannot generate a key.
pub fn generate(alg: Alg) -> Result<ClientKey, KeyError> {
    ClientKey::from_file_text(&generate_pem(alg)?)
}

/// A new key pair of `alg` with the `kid` an operator chose (not its
/// thumbprint), for tests of keys named by their thumbprint.
#[cfg(test)]
pub fn generate_with_kid(alg: Alg, kid: &str) -> ClientKey {
    let secret = generate(alg).expect("a key pair").to_secret();
    let mut jwk: serde_json::Value = serde_json::from_str(secret.expose_secret()).expect("a JWK");
    jwk["kid"] = kid.into();
    ClientKey::from_jwk_json(&jwk.to_string()).expect("the same key")
}

/// A new key pair's PKCS#8 document as PEM, for tests and bootstrap
/// examples: `alg` picks the type (RSA: 2048 bits).
///
/// # Errors
/// [`KeyError::Sign`] if the library cannot generate a key.
pub fn generate_pem(alg: Alg) -> Result<String, KeyError> {
    use aws_lc_rs::encoding::AsDer;
    let der: Vec<u8> = match alg {
        Alg::Es256 => {
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| KeyError::Sign)?
                .as_ref()
                .to_vec()
        }
        Alg::Rs256 => RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .and_then(|k| k.as_der())
            .map_err(|_| KeyError::Sign)?
            .as_ref()
            .to_vec(),
        Alg::EdDsa => Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| KeyError::Sign)?
            .as_ref()
            .to_vec(),
    };
    Ok(pem::encode(&pem::Pem::new("PRIVATE KEY", der)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7638 §3.1's example key and its thumbprint.
    const RFC7638_N: &str = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";

    #[test]
    fn thumbprint_matches_rfc_7638_example() {
        let jwk = Jwk {
            kty: "RSA".into(),
            n: Some(RFC7638_N.into()),
            e: Some("AQAB".into()),
            alg: Some("RS256".into()),
            kid: Some("2011-04-29".into()),
            ..Jwk::default()
        };
        assert_eq!(
            thumbprint(&jwk),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn a_published_key_re_encoded_by_a_server_has_the_same_thumbprint() {
        use serde_json::json;
        let rfc = json!({"kty": "RSA", "n": RFC7638_N, "e": "AQAB"});
        let expected = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs";
        assert_eq!(public_thumbprint(&rfc).as_deref(), Some(expected));
        // A sign octet before n, padding, the standard alphabet.
        let mut n = vec![0u8];
        n.extend(B64.decode(RFC7638_N).unwrap());
        let signed = base64::engine::general_purpose::STANDARD.encode(&n);
        let reencoded = json!({"kty": "RSA", "n": signed, "e": "AQAB==", "kid": "x"});
        assert_eq!(public_thumbprint(&reencoded).as_deref(), Some(expected));
        // An EC coordinate without its leading zero octets is padded back.
        let key = generate(Alg::Es256).unwrap();
        let mut public = key.public_jwk();
        let mut x = vec![0u8; 32];
        x[31] = 7;
        public["x"] = B64.encode(&x).into();
        let full = public_thumbprint(&public);
        public["x"] = B64.encode([7u8]).into();
        assert_eq!(public_thumbprint(&public), full);
        assert_eq!(
            public_thumbprint(&key.public_jwk()).unwrap(),
            key.thumbprint(),
            "rekeyd's own keys are canonical already"
        );
        for junk in [
            json!({"kty": "RSA", "n": "***", "e": "AQAB"}),
            json!({"kty": "EC", "crv": "P-256", "x": B64.encode([1u8; 33]), "y": "AQ"}),
            json!({"kty": "EC", "crv": "secp256k1", "x": "AQ", "y": "AQ"}),
            json!({"kty": "oct", "k": "AQ"}),
        ] {
            assert_eq!(public_thumbprint(&junk), None, "{junk}");
        }
    }

    fn round_trip(alg: Alg, kty: &str) {
        let pem = generate_pem(alg).unwrap();
        let key = ClientKey::from_file_text(&pem).unwrap();
        assert_eq!(key.alg(), alg);
        assert_eq!(key.kid(), key.thumbprint(), "no kid given: the thumbprint");
        let again = from_secret(&key.to_secret()).unwrap();
        assert_eq!(again.kid(), key.kid());
        let public = key.public_jwk();
        assert_eq!(public["kty"], kty);
        assert_eq!(public["alg"], alg.as_str());
        for private in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(public.get(private).is_none(), "{private} in {public}");
        }
        assert!(!key.sign(b"input").unwrap().is_empty());
        let debug = format!("{key:?}");
        let secret = key.to_secret();
        let jwk: serde_json::Value = serde_json::from_str(secret.expose_secret()).unwrap();
        let d = jwk["d"].as_str().unwrap();
        assert!(!debug.contains(d), "{debug}");
        assert!(debug.contains(key.kid()), "{debug}");
    }

    #[test]
    fn pkcs8_keys_of_each_type_become_jwks_and_sign() {
        round_trip(Alg::Es256, "EC");
        round_trip(Alg::Rs256, "RSA");
        round_trip(Alg::EdDsa, "OKP");
    }

    #[test]
    fn es256_signatures_verify_with_the_public_jwk() {
        let key = ClientKey::from_file_text(&generate_pem(Alg::Es256).unwrap()).unwrap();
        let public = key.public_jwk();
        let mut point = vec![4u8];
        point.extend(B64.decode(public["x"].as_str().unwrap()).unwrap());
        point.extend(B64.decode(public["y"].as_str().unwrap()).unwrap());
        let sig = key.sign(b"message").unwrap();
        assert_eq!(sig.len(), 64, "JWS r || s");
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point)
            .verify(b"message", &sig)
            .unwrap();
    }

    #[test]
    fn a_jwk_keeps_its_kid_and_refuses_a_wrong_alg() {
        let key = ClientKey::from_file_text(&generate_pem(Alg::EdDsa).unwrap()).unwrap();
        let mut jwk: serde_json::Value =
            serde_json::from_str(key.to_secret().expose_secret()).unwrap();
        jwk["kid"] = "my-key-1".into();
        let with_kid = ClientKey::from_file_text(&jwk.to_string()).unwrap();
        assert_eq!(with_kid.kid(), "my-key-1");
        jwk["alg"] = "ES256".into();
        let err = ClientKey::from_jwk_json(&jwk.to_string()).unwrap_err();
        assert!(err.to_string().contains("EdDSA"), "{err}");
    }

    #[test]
    fn errors_name_the_problem_not_the_content() {
        let key = ClientKey::from_file_text(&generate_pem(Alg::Es256).unwrap()).unwrap();
        let secret = key.to_secret();
        let mut jwk: serde_json::Value = serde_json::from_str(secret.expose_secret()).unwrap();
        let d = jwk["d"].as_str().unwrap().to_string();
        // A public key only.
        jwk.as_object_mut().unwrap().remove("d");
        let err = ClientKey::from_jwk_json(&jwk.to_string()).unwrap_err();
        assert!(err.to_string().contains("\"d\""), "{err}");
        // Broken JSON that holds the private value.
        let broken = format!("{{\"kty\":\"EC\",\"d\":\"{d}\"");
        let err = ClientKey::from_file_text(&broken).unwrap_err().to_string();
        assert!(err.contains("not valid JSON") && !err.contains(&d), "{err}");
        // A value of the wrong type (serde_json would quote it).
        let wrong = format!("{{\"kty\":\"EC\",\"d\":[\"{d}\"]}}");
        let err = ClientKey::from_file_text(&wrong).unwrap_err().to_string();
        assert!(!err.contains(&d), "{err}");
        let err = ClientKey::from_file_text(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("encrypted"), "{err}");
        let legacy = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
                      DEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\n\
                      AAAA\n-----END RSA PRIVATE KEY-----\n";
        let err = ClientKey::from_file_text(legacy).unwrap_err();
        assert!(err.to_string().contains("encrypted"), "{err}");
        let err = ClientKey::from_file_text("secret-value-123")
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("secret-value-123") && err.contains("PEM"),
            "{err}"
        );
        let err = ClientKey::from_file_text(r#"{"keys":[]}"#).unwrap_err();
        assert!(err.to_string().contains("JWK set"), "{err}");
    }
}
