//! SCRAM-SHA-256 as PostgreSQL speaks it (RFC 5802 / RFC 7677): message parsing and the key
//! arithmetic, shared by the client-side re-authentication of [`crate::auth`] and the admin
//! console's password check.
//!
//! The one fact everything here rests on: a client's proof is `ClientKey XOR
//! HMAC(StoredKey, AuthMessage)`, so whoever knows `StoredKey` can recover `ClientKey` from a
//! proof, check it (`SHA-256(ClientKey) == StoredKey`), and compute a fresh proof for a
//! different AuthMessage — without ever learning the password.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SASL mechanism name (without channel binding).
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

type HmacSha256 = Hmac<Sha256>;

pub fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// RFC 5802's `Hi()`: PBKDF2-HMAC-SHA-256 with one output block.
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations)
}

/// The password as SCRAM hashes it: SASLprep'd when that succeeds, as is otherwise (what
/// PostgreSQL and libpq do, so non-ASCII passwords match).
pub fn normalize(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(prepped) => prepped.as_bytes().to_vec(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

/// Compares without an early exit, so timing does not reveal how much of a value matched.
/// Different lengths return at once: use it for values whose length is public (keys,
/// signatures, digests); a secret of unknown length goes through
/// [`crate::secret::secret_eq`].
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// What a server stores to check SCRAM logins: `StoredKey = H(ClientKey)` and `ServerKey`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

impl ScramKeys {
    /// The keys of a clear-text password.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
        let salted = salted_password(&normalize(password), salt, iterations);
        ScramKeys {
            stored_key: Sha256::digest(hmac(&salted, b"Client Key")).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// The ClientKey behind `proof` for `auth_message`, if the proof is right.
    pub fn recover_client_key(&self, auth_message: &str, proof: &[u8]) -> Option<[u8; 32]> {
        let proof: [u8; 32] = proof.try_into().ok()?;
        let signature = hmac(&self.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key.iter_mut().zip(proof.iter().zip(signature)) {
            *k = p ^ s;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        constant_time_eq(&stored, &self.stored_key).then_some(client_key)
    }

    /// The proof a client holding `client_key` sends for `auth_message`.
    pub fn client_proof(&self, client_key: &[u8; 32], auth_message: &str) -> [u8; 32] {
        let signature = hmac(&self.stored_key, auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for (p, (k, s)) in proof.iter_mut().zip(client_key.iter().zip(signature)) {
            *p = k ^ s;
        }
        proof
    }

    /// The server's signature (`v=` of server-final) for `auth_message`.
    pub fn server_signature(&self, auth_message: &str) -> [u8; 32] {
        hmac(&self.server_key, auth_message.as_bytes())
    }
}

/// A stored SCRAM secret, `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (the
/// `pg_authid.rolpassword` form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub keys: ScramKeys,
}

impl ScramSecret {
    /// Parses a stored secret; `None` for anything else (an MD5 hash, a clear password).
    pub fn parse(secret: &str) -> Option<ScramSecret> {
        let rest = secret.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let key = |b64: &str| -> Option<[u8; 32]> { BASE64.decode(b64).ok()?.try_into().ok() };
        Some(ScramSecret {
            iterations: iterations.parse().ok().filter(|&i| i > 0)?,
            salt: BASE64.decode(salt).ok()?,
            keys: ScramKeys {
                stored_key: key(stored)?,
                server_key: key(server)?,
            },
        })
    }
}

impl ScramSecret {
    /// A random secret nobody's password matches: checking a proof against it fails exactly
    /// like a wrong password, so a missing role cannot be told from a wrong password (as
    /// PostgreSQL's own mock authentication does).
    pub fn mock() -> ScramSecret {
        let random = || -> [u8; 32] { rand::random() };
        ScramSecret {
            iterations: 4096,
            salt: random()[..16].to_vec(),
            keys: ScramKeys {
                stored_key: random(),
                server_key: random(),
            },
        }
    }
}

/// A client-first message: `gs2-header client-first-bare`.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientFirst<'a> {
    /// `n`, `y`, or `p=<binding type>`.
    pub channel_binding: &'a str,
    /// The whole gs2 header including its trailing comma (what `c=` must repeat).
    pub gs2_header: &'a str,
    pub bare: &'a str,
    pub nonce: &'a str,
}

impl<'a> ClientFirst<'a> {
    pub fn parse(data: &'a [u8]) -> Result<ClientFirst<'a>, String> {
        let text = std::str::from_utf8(data).map_err(|_| "client-first is not UTF-8")?;
        let cbind_end = text.find(',').ok_or("client-first has no gs2 header")?;
        let authzid_end = text[cbind_end + 1..]
            .find(',')
            .map(|i| cbind_end + 1 + i)
            .ok_or("client-first has no body")?;
        let channel_binding = &text[..cbind_end];
        if !(matches!(channel_binding, "n" | "y") || channel_binding.starts_with("p=")) {
            return Err(format!(
                "invalid gs2 channel binding flag {channel_binding:?}"
            ));
        }
        if authzid_end != cbind_end + 1 {
            return Err("authorization identities are not supported".to_owned());
        }
        let bare = &text[authzid_end + 1..];
        let nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or("client-first has no nonce")?;
        if !nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err("invalid client nonce".to_owned());
        }
        Ok(ClientFirst {
            channel_binding,
            gs2_header: &text[..=authzid_end],
            bare,
            nonce,
        })
    }
}

/// A client-final message: `c=<binding>,r=<nonce>[,...],p=<proof>`.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientFinal<'a> {
    /// Everything before `,p=`: part of the AuthMessage.
    pub without_proof: &'a str,
    /// The `c=` value (base64).
    pub channel_binding: &'a str,
    pub nonce: &'a str,
    pub proof: Vec<u8>,
}

impl<'a> ClientFinal<'a> {
    pub fn parse(data: &'a [u8]) -> Result<ClientFinal<'a>, String> {
        let text = std::str::from_utf8(data).map_err(|_| "client-final is not UTF-8")?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or("client-final has no proof")?;
        let mut channel_binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                channel_binding = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        Ok(ClientFinal {
            without_proof,
            channel_binding: channel_binding.ok_or("client-final has no channel binding")?,
            nonce: nonce.ok_or("client-final has no nonce")?,
            proof: BASE64
                .decode(proof)
                .map_err(|_| "client-final proof is not base64")?,
        })
    }
}

/// The AuthMessage both proofs and signatures are computed over.
pub fn auth_message(
    client_first_bare: &str,
    server_first: &str,
    final_without_proof: &str,
) -> String {
    format!("{client_first_bare},{server_first},{final_without_proof}")
}

pub fn base64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Keys derived the way PostgreSQL derives them when storing password "pencil".
    fn secret() -> ScramSecret {
        let keys = ScramKeys::from_password("pencil", b"0123456789abcdef", 4096);
        ScramSecret {
            iterations: 4096,
            salt: b"0123456789abcdef".to_vec(),
            keys,
        }
    }

    #[test]
    fn stored_secrets_parse_and_other_forms_do_not() {
        let s = secret();
        let text = format!(
            "SCRAM-SHA-256$4096:{}${}:{}",
            base64(&s.salt),
            base64(&s.keys.stored_key),
            base64(&s.keys.server_key)
        );
        assert_eq!(ScramSecret::parse(&text), Some(s));
        assert_eq!(
            ScramSecret::parse("md5c9e8f1e2d6e0aa1b5a4c1d2e3f405162"),
            None
        );
        assert_eq!(ScramSecret::parse("SCRAM-SHA-256$0:AAAA$AAAA:AAAA"), None);
        assert_eq!(ScramSecret::parse("SCRAM-SHA-256$4096:!!$x:y"), None);
    }

    #[test]
    fn a_proof_yields_the_client_key_and_a_new_proof_for_another_message() {
        let s = secret();
        let salted = salted_password(b"pencil", &s.salt, s.iterations);
        let client_key = hmac(&salted, b"Client Key");
        let proof = s.keys.client_proof(&client_key, "first");
        assert_eq!(s.keys.recover_client_key("first", &proof), Some(client_key));
        assert_eq!(s.keys.recover_client_key("second", &proof), None);
        assert_eq!(s.keys.recover_client_key("first", &proof[..31]), None);
        let other = s.keys.client_proof(&client_key, "second");
        assert_eq!(
            s.keys.recover_client_key("second", &other),
            Some(client_key)
        );
    }

    /// RFC 7677, section 3: user "user", password "pencil", the RFC's nonces, salt and
    /// iteration count. The client-final proof and the server signature must come out as the
    /// RFC prints them, through the same parsing and key arithmetic lockguard uses on the wire.
    #[test]
    fn rfc_7677_test_vector() {
        let client_first = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                            s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let client_final = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let server_final = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

        let first = ClientFirst::parse(client_first).expect("client-first");
        assert_eq!(first.gs2_header, "n,,");
        let fin = ClientFinal::parse(client_final).expect("client-final");
        assert_eq!(fin.channel_binding, base64(first.gs2_header.as_bytes()));
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        let auth = auth_message(first.bare, server_first, fin.without_proof);

        // The client's side: the proof from the password.
        let salted = salted_password(&normalize("pencil"), &salt, 4096);
        let client_key = hmac(&salted, b"Client Key");
        let keys = ScramKeys::from_password("pencil", &salt, 4096);
        assert_eq!(keys.client_proof(&client_key, &auth).to_vec(), fin.proof);
        // The server's side: the proof checks out against the stored key, and the signature.
        assert_eq!(keys.recover_client_key(&auth, &fin.proof), Some(client_key));
        let signature = format!("v={}", base64(&keys.server_signature(&auth)));
        assert_eq!(signature, server_final);
    }

    #[test]
    fn client_messages_parse() {
        let first = ClientFirst::parse(b"y,,n=,r=abc").expect("client-first");
        assert_eq!(
            first,
            ClientFirst {
                channel_binding: "y",
                gs2_header: "y,,",
                bare: "n=,r=abc",
                nonce: "abc"
            }
        );
        assert!(ClientFirst::parse(b"y,a=someone,n=,r=abc").is_err());
        assert!(ClientFirst::parse(b"x,,n=,r=abc").is_err());
        assert!(ClientFirst::parse(b"n,,n=").is_err());
        let fin = ClientFinal::parse(b"c=eSws,r=abcdef,p=AAAA").expect("client-final");
        assert_eq!(fin.without_proof, "c=eSws,r=abcdef");
        assert_eq!(fin.channel_binding, "eSws");
        assert_eq!(fin.nonce, "abcdef");
        assert_eq!(fin.proof, vec![0, 0, 0]);
        assert!(ClientFinal::parse(b"c=eSws,r=abc").is_err());
    }
}
