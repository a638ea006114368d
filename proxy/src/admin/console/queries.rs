//! The console's statements: parsed as admin commands (simple and extended protocol, no
//! parameters), run for the connection's login, answered as tables.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::{stream, Sink};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{DataRowEncoder, FieldInfo, QueryResponse, Response};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use tracing::info;

use crate::admin::commands::{AdminError, Column, ColumnType, Command, Table, Value};
use crate::admin::{Admin, Login};
use crate::protocol::sqlstate;

pub(super) struct Queries {
    pub(super) admin: Arc<Admin>,
    pub(super) parser: Arc<CommandParser>,
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
    /// The connection's login as the configuration in force sees it: a RELOAD that changed a
    /// user's role applies from their next command, and one that removed the user ends the
    /// session (FATAL 28000), as it would refuse their next login.
    fn login_in_force(&self, login: &Login) -> PgWireResult<Login> {
        if let Some((_, current)) = self.admin.credentials().user(&login.user) {
            return Ok(current);
        }
        if self.admin.config().admin.trust_loopback {
            // An unlisted name is a trusted loopback login; it could log in again right now.
            return Ok(login.clone());
        }
        info!(user = %login.user, "admin console user no longer configured; closing the session");
        Err(PgWireError::UserError(Box::new(ErrorInfo::new(
            "FATAL".to_owned(),
            sqlstate::INVALID_AUTHORIZATION.to_owned(),
            format!(
                "lockguard: admin console user \"{}\" is no longer configured",
                login.user
            ),
        ))))
    }

    async fn run<C: ClientInfo>(
        &self,
        client: &C,
        command: &Command,
        format: &Format,
    ) -> PgWireResult<Response> {
        let login = self.login_in_force(&*login_of(client)?)?;
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
pub(super) struct CommandParser;

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
