//! The console's login: the user's password checked by SCRAM-SHA-256 or MD5 (as
//! `admin.auth_method` says at the time of the login), the role bound to the connection.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::Sink;
use lockguard_config::{AdminAuthMethod, AdminRole};
use pgwire::api::auth::mechanism::AuthMechanism;
use pgwire::api::auth::{
    protocol_negotiation, save_startup_parameters_to_metadata, AuthDriver, AuthOutcome,
    DefaultServerParameterProvider, StartupHandler,
};
use pgwire::api::{ClientInfo, METADATA_USER};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tracing::{info, warn};

use crate::admin::auth::{Expected, Md5Mechanism, ScramMechanism};
use crate::admin::{Admin, Login};

pub(super) struct Startup {
    pub(super) admin: Arc<Admin>,
    pub(super) driver: AuthDriver<DefaultServerParameterProvider, Login>,
}

impl Startup {
    /// Binds the login to the connection and finishes the startup.
    async fn accept<C>(
        &self,
        client: &mut C,
        login: Login,
        final_message: Option<pgwire::messages::startup::Authentication>,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        info!(
            peer = %client.socket_addr(),
            user = %login.user,
            role = login.role.as_str(),
            "admin console login"
        );
        client.session_extensions().insert(login);
        self.driver
            .complete_authentication(client, final_message)
            .await
    }

    async fn outcome<C>(
        &self,
        client: &mut C,
        outcome: PgWireResult<AuthOutcome<Login>>,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let user = client
            .metadata()
            .get(METADATA_USER)
            .cloned()
            .unwrap_or_default();
        match outcome {
            Ok(AuthOutcome::InProgress) => Ok(()),
            Ok(AuthOutcome::Authenticated {
                identity: Some(login),
                final_message,
            }) => self.accept(client, login, final_message).await,
            Ok(AuthOutcome::Authenticated { identity: None, .. }) => {
                Err(PgWireError::InvalidPassword(user))
            }
            Err(e) => {
                warn!(
                    peer = %client.socket_addr(),
                    user = %user,
                    error = %e,
                    "admin console login refused"
                );
                Err(e)
            }
        }
    }
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(startup) => {
                protocol_negotiation(client, &startup).await?;
                save_startup_parameters_to_metadata(client, &startup);
                let user = client
                    .metadata()
                    .get(METADATA_USER)
                    .cloned()
                    .ok_or(PgWireError::UserNameRequired)?;
                let config = self.admin.config();
                let known = self.admin.credentials().user(&user);
                if known.is_none() && config.admin.trust_loopback {
                    // Validation allows this only on a loopback listen address.
                    return self
                        .accept(client, Login::console(&user, AdminRole::Admin), None)
                        .await;
                }
                // An unknown name runs the same exchange and fails at the end.
                let expected = Expected::for_user(&user, known);
                let mechanism: Box<dyn AuthMechanism<Login>> = match config.admin.auth_method {
                    AdminAuthMethod::ScramSha256 => Box::new(ScramMechanism::new(expected)),
                    AdminAuthMethod::Md5 => Box::new(Md5Mechanism::new(expected)),
                };
                let outcome = self.driver.begin_authentication(client, mechanism).await;
                self.outcome(client, outcome).await
            }
            PgWireFrontendMessage::PasswordMessageFamily(message) => {
                let outcome = self.driver.advance_authentication(client, message).await;
                self.outcome(client, outcome).await
            }
            _ => Ok(()),
        }
    }
}
