//! Password checks of the admin console, as pgwire authentication mechanisms: SCRAM-SHA-256
//! (RFC 5802 / RFC 7677, as PostgreSQL does it, without channel binding) and MD5.
//!
//! Passwords come from `[[admin.users]]` in clear, so each login derives its SCRAM keys from a
//! fresh random salt. An unknown user name runs the same exchange against a random password
//! and fails at the end, so the console does not tell which names exist.
//!
//! pgwire's own mechanisms (`md5pass`, `sasl::scram`, feature `server-api-ring`) were weighed
//! against these: its MD5 mechanism reports no identity, so the console could not know the
//! user's role; both compare the client's proof with `==` rather than in constant time; and
//! the feature links `x509-certificate` into the binary for channel binding the console does
//! not offer.

use async_trait::async_trait;
use bytes::Bytes;
use md5::{Digest, Md5};
use pgwire::api::auth::mechanism::{AuthMechanism, AuthState};
use pgwire::api::ClientInfo;
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::startup::{Authentication, PasswordMessageFamily};
use rand::RngCore;
use tokio::sync::Semaphore;

use super::Login;
use crate::scram::{self, constant_time_eq, ClientFinal, ClientFirst, ScramKeys, SCRAM_SHA_256};

/// PBKDF2 rounds, PostgreSQL's default `scram_iterations`.
const SCRAM_ITERATIONS: u32 = 4096;
const SALT_LEN: usize = 16;
const SERVER_NONCE_LEN: usize = 18;

/// What the mechanism checks the client against. `login` is `None` for an unknown user: the
/// exchange runs against a random password and fails.
pub struct Expected {
    pub user: String,
    pub password: String,
    pub login: Option<Login>,
}

impl Expected {
    /// The expectation for `user`: their password and login, or a random password.
    pub fn for_user(user: &str, known: Option<(String, Login)>) -> Expected {
        match known {
            Some((password, login)) => Expected {
                user: user.to_owned(),
                password,
                login: Some(login),
            },
            None => Expected {
                user: user.to_owned(),
                password: scram::base64(&random_bytes(24)),
                login: None,
            },
        }
    }

    fn failed(&self) -> AuthState<Login> {
        AuthState::Failed(PgWireError::InvalidPassword(self.user.clone()))
    }

    fn succeeded(&self, final_message: Option<Authentication>) -> AuthState<Login> {
        match &self.login {
            Some(login) => AuthState::Ok {
                final_message,
                identity: Some(login.clone()),
            },
            None => self.failed(),
        }
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// SCRAM key derivations running at once, across all logins.
///
/// A derivation is [`SCRAM_ITERATIONS`] PBKDF2 rounds, milliseconds of CPU. It runs on a
/// blocking thread, because the proxy forwards every session on one runtime thread, and one
/// at a time, so that a flood of logins (unknown users cost the same) leaves the other core
/// to forwarding.
static KEY_DERIVATIONS: Semaphore = Semaphore::const_new(1);

/// The SCRAM keys of `password` with `salt`, derived off the runtime thread.
async fn derive_keys(password: &str, salt: &[u8]) -> Result<ScramKeys, String> {
    let turn = KEY_DERIVATIONS
        .acquire()
        .await
        .map_err(|_| "SCRAM key derivation is shut down".to_owned())?;
    let (password, salt) = (password.to_owned(), salt.to_vec());
    let keys = tokio::task::spawn_blocking(move || {
        ScramKeys::from_password(&password, &salt, SCRAM_ITERATIONS)
    })
    .await
    .map_err(|e| format!("SCRAM key derivation failed: {e}"))?;
    drop(turn);
    Ok(keys)
}

// ---- MD5 -----------------------------------------------------------------------------------

/// PostgreSQL's MD5 challenge: the client answers `"md5" + md5(md5(password + user) + salt)`.
pub struct Md5Mechanism {
    expected: Expected,
    salt: [u8; 4],
}

impl Md5Mechanism {
    pub fn new(expected: Expected) -> Self {
        let mut salt = [0u8; 4];
        rand::rng().fill_bytes(&mut salt);
        Md5Mechanism { expected, salt }
    }
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a client sends for `password` / `user` / `salt`.
pub fn md5_response(user: &str, password: &str, salt: &[u8]) -> String {
    let inner = md5_hex(&[password.as_bytes(), user.as_bytes()]);
    format!("md5{}", md5_hex(&[inner.as_bytes(), salt]))
}

#[async_trait]
impl AuthMechanism<Login> for Md5Mechanism {
    async fn begin(
        &mut self,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> PgWireResult<AuthState<Login>> {
        Ok(AuthState::InProgress(Authentication::MD5Password(
            self.salt.to_vec(),
        )))
    }

    async fn next(
        &mut self,
        _client: &(dyn ClientInfo + Send + Sync),
        message: PasswordMessageFamily,
    ) -> PgWireResult<AuthState<Login>> {
        let answer = message.into_password()?.password;
        let wanted = md5_response(&self.expected.user, &self.expected.password, &self.salt);
        if constant_time_eq(answer.as_bytes(), wanted.as_bytes()) {
            Ok(self.expected.succeeded(None))
        } else {
            Ok(self.expected.failed())
        }
    }
}

// ---- SCRAM-SHA-256 -------------------------------------------------------------------------

enum ScramStep {
    /// Waiting for the client-first message.
    Start,
    /// Sent server-first; waiting for client-final.
    Challenged {
        client_first_bare: String,
        server_first: String,
        /// The gs2 header the client sent, which `c=` must repeat.
        gs2_header: String,
        nonce: String,
        keys: ScramKeys,
    },
    Done,
}

/// SCRAM-SHA-256 without channel binding: `-PLUS` is not offered, also over TLS (a client
/// that could bind says so with the `y` flag, which is then correct).
pub struct ScramMechanism {
    expected: Expected,
    step: ScramStep,
}

impl ScramMechanism {
    pub fn new(expected: Expected) -> Self {
        ScramMechanism {
            expected,
            step: ScramStep::Start,
        }
    }

    async fn client_first(&mut self, data: &[u8]) -> Result<Authentication, String> {
        let first = ClientFirst::parse(data)?;
        if first.channel_binding.starts_with("p=") {
            return Err("channel binding is not supported by the admin console".to_owned());
        }
        // PostgreSQL ignores the SCRAM user name (the startup packet's counts); so do we.
        let nonce = format!(
            "{}{}",
            first.nonce,
            scram::base64(&random_bytes(SERVER_NONCE_LEN))
        );
        let salt = random_bytes(SALT_LEN);
        let keys = derive_keys(&self.expected.password, &salt).await?;
        let server_first = format!("r={nonce},s={},i={SCRAM_ITERATIONS}", scram::base64(&salt));
        self.step = ScramStep::Challenged {
            client_first_bare: first.bare.to_owned(),
            server_first: server_first.clone(),
            gs2_header: first.gs2_header.to_owned(),
            nonce,
            keys,
        };
        Ok(Authentication::SASLContinue(Bytes::from(server_first)))
    }

    /// Checks client-final; `Ok(Some(server_final))` when the proof is right.
    fn client_final(&mut self, data: &[u8]) -> Result<Option<Authentication>, String> {
        let ScramStep::Challenged {
            client_first_bare,
            server_first,
            gs2_header,
            nonce,
            keys,
        } = std::mem::replace(&mut self.step, ScramStep::Done)
        else {
            return Err("unexpected SCRAM message".to_owned());
        };
        let last = ClientFinal::parse(data)?;
        if last.channel_binding != scram::base64(gs2_header.as_bytes()) {
            return Err("channel binding data does not match".to_owned());
        }
        if last.nonce != nonce {
            return Err("nonce does not match".to_owned());
        }
        let auth_message =
            scram::auth_message(&client_first_bare, &server_first, last.without_proof);
        if keys
            .recover_client_key(&auth_message, &last.proof)
            .is_none()
        {
            return Ok(None);
        }
        let server_final = format!("v={}", scram::base64(&keys.server_signature(&auth_message)));
        Ok(Some(Authentication::SASLFinal(Bytes::from(server_final))))
    }
}

#[async_trait]
impl AuthMechanism<Login> for ScramMechanism {
    async fn begin(
        &mut self,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> PgWireResult<AuthState<Login>> {
        Ok(AuthState::InProgress(Authentication::SASL(vec![
            SCRAM_SHA_256.to_owned(),
        ])))
    }

    async fn next(
        &mut self,
        _client: &(dyn ClientInfo + Send + Sync),
        message: PasswordMessageFamily,
    ) -> PgWireResult<AuthState<Login>> {
        let invalid = |e: String| Ok(AuthState::Failed(PgWireError::InvalidScramMessage(e)));
        match self.step {
            ScramStep::Start => {
                let initial = message.into_sasl_initial_response()?;
                if initial.auth_method != SCRAM_SHA_256 {
                    return invalid(format!(
                        "unsupported SASL mechanism {:?}; use {SCRAM_SHA_256}",
                        initial.auth_method
                    ));
                }
                let data = initial.data.unwrap_or_default();
                match self.client_first(&data).await {
                    Ok(next) => Ok(AuthState::InProgress(next)),
                    Err(e) => invalid(e),
                }
            }
            ScramStep::Challenged { .. } => {
                let response = message.into_sasl_response()?;
                match self.client_final(&response.data) {
                    Ok(Some(final_message)) => Ok(self.expected.succeeded(Some(final_message))),
                    Ok(None) => Ok(self.expected.failed()),
                    Err(e) => invalid(e),
                }
            }
            ScramStep::Done => invalid("the SCRAM exchange is already over".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_matches_postgres() {
        // "md5" + md5(md5("secret" || "alice") || salt), as libpq computes it (values from
        // Python's hashlib).
        assert_eq!(
            md5_hex(&[b"secret", b"alice"]),
            "4a0a68b43b6cd5cf266fa02f196e2371"
        );
        let answer = md5_response("alice", "secret", &[1, 2, 3, 4]);
        assert_eq!(answer, "md598a0412b9c31436fc53776e863350083");
        assert_ne!(answer, md5_response("alice", "secret", &[1, 2, 3, 5]));
    }

    /// Runs the client side of SCRAM against the mechanism's message functions.
    async fn scram_login(
        stored_password: &str,
        client_password: &str,
    ) -> Result<Option<Authentication>, String> {
        let mut mechanism = ScramMechanism::new(Expected::for_user(
            "ops",
            Some((
                stored_password.to_owned(),
                Login::console("ops", lockguard_config::AdminRole::Admin),
            )),
        ));
        let client_first_bare = "n=,r=clientnonce";
        let Authentication::SASLContinue(server_first) = mechanism
            .client_first(format!("n,,{client_first_bare}").as_bytes())
            .await?
        else {
            panic!("expected server-first");
        };
        let server_first = String::from_utf8(server_first.to_vec()).expect("utf-8");
        let attr = |name: &str| {
            server_first
                .split(',')
                .find_map(|a| a.strip_prefix(name))
                .expect("attribute")
                .to_owned()
        };
        let (nonce, salt) = (attr("r="), attr("s="));
        let salt =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, salt).expect("salt");
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = scram::auth_message(client_first_bare, &server_first, &without_proof);
        let salted =
            scram::salted_password(&scram::normalize(client_password), &salt, SCRAM_ITERATIONS);
        let client_key = scram::hmac(&salted, b"Client Key");
        let keys = ScramKeys::from_password(client_password, &salt, SCRAM_ITERATIONS);
        let proof = keys.client_proof(&client_key, &auth_message);
        mechanism.client_final(format!("{without_proof},p={}", scram::base64(&proof)).as_bytes())
    }

    #[tokio::test]
    async fn scram_accepts_the_password_and_refuses_another() {
        assert!(matches!(
            scram_login("pw", "pw").await,
            Ok(Some(Authentication::SASLFinal(_)))
        ));
        assert!(matches!(scram_login("pw", "wrong").await, Ok(None)));
    }

    /// The derivation runs off the runtime thread: on a current-thread runtime (as the proxy
    /// runs on small machines) other tasks keep running while it is under way. Were it
    /// computed inline, the other task would run at most once before it finished.
    #[tokio::test(flavor = "current_thread")]
    async fn key_derivation_leaves_the_runtime_thread_free() {
        let done = std::cell::Cell::new(false);
        let (keys, turns) = tokio::join!(
            async {
                let keys = derive_keys("pw", b"salt").await;
                done.set(true);
                keys
            },
            async {
                let mut turns = 0u64;
                while !done.get() {
                    tokio::task::yield_now().await;
                    turns += 1;
                }
                turns
            }
        );
        assert!(keys.is_ok());
        assert!(
            turns >= 2,
            "the runtime ran {turns} turns during the derivation"
        );
    }

    #[test]
    fn unknown_users_never_succeed() {
        let expected = Expected::for_user("nobody", None);
        assert!(expected.login.is_none());
        assert!(matches!(expected.succeeded(None), AuthState::Failed(_)));
    }
}
