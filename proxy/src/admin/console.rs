//! The admin console: a PostgreSQL-protocol server (built on `pgwire`) so operators use `psql`
//! and drivers. It authenticates console users ([`super::auth`]), parses each statement with
//! [`Command::parse`] and answers with the command's table. The simple and the extended query
//! protocol are both accepted; statements take no parameters.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::{stream, Sink};
use lockguard_config::{AdminAuthMethod, AdminRole};
use pgwire::api::auth::mechanism::AuthMechanism;
use pgwire::api::auth::{
    protocol_negotiation, save_startup_parameters_to_metadata, AuthDriver, AuthOutcome,
    DefaultServerParameterProvider, StartupHandler,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{DataRowEncoder, FieldInfo, QueryResponse, Response};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, PgWireServerHandlers, Type, METADATA_USER};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::auth::{Expected, Md5Mechanism, ScramMechanism};
use super::commands::{AdminError, Column, ColumnType, Command, Table, Value};
use super::{Admin, Login};

/// Accepts console connections until `stop` is cancelled, then closes the open ones.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    let handlers = Arc::new(Handlers::new(admin));
    let connections = TaskTracker::new();
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "admin console accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let _ = socket.set_nodelay(true);
        let handlers = Arc::clone(&handlers);
        let stop = stop.clone();
        connections.spawn(async move {
            debug!(%peer, "admin console connection");
            tokio::select! {
                served = pgwire::tokio::process_socket(socket, None, handlers) => {
                    if let Err(e) = served {
                        debug!(%peer, error = %e, "admin console connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// The pgwire handlers of the console.
struct Handlers {
    startup: Arc<Startup>,
    queries: Arc<Queries>,
}

impl Handlers {
    fn new(admin: Arc<Admin>) -> Handlers {
        let mut parameters = DefaultServerParameterProvider::default();
        // Clients read the major version from here; name what they are talking to.
        parameters.server_version = format!("16.0 ({})", super::commands::version());
        parameters.is_superuser = false;
        Handlers {
            startup: Arc::new(Startup {
                admin: Arc::clone(&admin),
                driver: AuthDriver::new(parameters),
            }),
            queries: Arc::new(Queries {
                admin,
                parser: Arc::new(CommandParser),
            }),
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.queries)
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::clone(&self.queries)
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::clone(&self.startup)
    }
}

// ---- authentication ----------------------------------------------------------------------

struct Startup {
    admin: Arc<Admin>,
    driver: AuthDriver<DefaultServerParameterProvider, Login>,
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

// ---- queries -----------------------------------------------------------------------------

struct Queries {
    admin: Arc<Admin>,
    parser: Arc<CommandParser>,
}

/// The console's errors as PostgreSQL ErrorResponses (SQLSTATE, message, hint).
fn pg_error(e: AdminError) -> PgWireError {
    let mut info = ErrorInfo::new("ERROR".to_owned(), e.sqlstate().to_owned(), e.to_string());
    info.hint = e.hint().map(str::to_owned);
    PgWireError::UserError(Box::new(info))
}

/// The login bound to this connection by [`Startup::accept`].
fn login_of<C: ClientInfo>(client: &C) -> PgWireResult<Arc<Login>> {
    client.session_extensions().get::<Login>().ok_or_else(|| {
        PgWireError::UserError(Box::new(ErrorInfo::new(
            "FATAL".to_owned(),
            "28000".to_owned(),
            "admin console connection is not authenticated".to_owned(),
        )))
    })
}

impl ColumnType {
    fn pg_type(self) -> Type {
        match self {
            ColumnType::Text => Type::TEXT,
            ColumnType::Int4 => Type::INT4,
            ColumnType::Int8 => Type::INT8,
            ColumnType::Float8 => Type::FLOAT8,
            ColumnType::Bool => Type::BOOL,
        }
    }
}

/// Field descriptions of `columns`, in the formats the client asked for.
fn fields(columns: &[Column], format: &Format) -> Vec<FieldInfo> {
    columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            FieldInfo::new(
                c.name.to_owned(),
                None,
                None,
                c.kind.pg_type(),
                format.format_for(i),
            )
        })
        .collect()
}

/// Encodes one cell as its column's type. Values are built for their column, so a mismatch
/// is a bug; it is sent as NULL rather than as bytes of the wrong width.
fn encode(encoder: &mut DataRowEncoder, kind: ColumnType, value: &Value) -> PgWireResult<()> {
    match (kind, value) {
        (ColumnType::Text, Value::Text(s)) => encoder.encode_field(s),
        (ColumnType::Int4, Value::Int(n)) => encoder.encode_field(&i32::try_from(*n).ok()),
        (ColumnType::Int8, Value::Int(n)) => encoder.encode_field(n),
        (ColumnType::Float8, Value::Float(x)) => encoder.encode_field(x),
        (ColumnType::Bool, Value::Bool(b)) => encoder.encode_field(b),
        _ => encoder.encode_field(&None::<i32>),
    }
}

fn query_response(table: Table, format: &Format) -> PgWireResult<QueryResponse> {
    let schema = Arc::new(fields(table.columns, format));
    let mut encoder = DataRowEncoder::new(Arc::clone(&schema));
    let mut rows = Vec::with_capacity(table.rows.len());
    for row in &table.rows {
        for (column, value) in table.columns.iter().zip(row) {
            encode(&mut encoder, column.kind, value)?;
        }
        rows.push(Ok(encoder.take_row()));
    }
    let mut response = QueryResponse::new(schema, stream::iter(rows));
    response.set_command_tag(table.tag);
    Ok(response)
}

impl Queries {
    async fn run<C: ClientInfo>(
        &self,
        client: &C,
        command: &Command,
        format: &Format,
    ) -> PgWireResult<Response> {
        let login = login_of(client)?;
        let table = self
            .admin
            .execute(command, &login)
            .await
            .map_err(pg_error)?;
        Ok(Response::Query(query_response(table, format)?))
    }
}

#[async_trait]
impl SimpleQueryHandler for Queries {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let command = Command::parse(query).map_err(pg_error)?;
        Ok(vec![
            self.run(client, &command, &Format::UnifiedText).await?,
        ])
    }
}

/// Parses statements of the extended protocol into commands; their result columns are known
/// before they run.
#[derive(Debug, Default)]
struct CommandParser;

#[async_trait]
impl QueryParser for CommandParser {
    type Statement = Command;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Command>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        Command::parse(sql).map(Some).map_err(pg_error)
    }

    fn get_parameter_types(&self, _command: &Command) -> PgWireResult<Vec<Type>> {
        Ok(Vec::new())
    }

    fn get_result_schema(
        &self,
        command: &Command,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(fields(
            command.columns(),
            format.unwrap_or(&Format::UnifiedText),
        ))
    }
}

#[async_trait]
impl ExtendedQueryHandler for Queries {
    type Statement = Command;
    type QueryParser = CommandParser;

    fn query_parser(&self) -> Arc<CommandParser> {
        Arc::clone(&self.parser)
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Command>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Command>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if portal.parameter_len() > 0 {
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".to_owned(),
                "08P01".to_owned(),
                format!(
                    "admin commands take no parameters; {} were bound",
                    portal.parameter_len()
                ),
            ))));
        }
        self.run(
            client,
            &portal.statement.statement,
            &portal.result_column_format,
        )
        .await
    }
}
