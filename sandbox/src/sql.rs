//! Running SQL on a sandbox from blocking code, and reading simple-query answers.

use std::io;

use tokio_postgres::{NoTls, SimpleQueryMessage};

use crate::ctx;

/// Runs `sql` as one simple-query batch on a throwaway current-thread runtime in its own OS
/// thread, so it works whether or not the caller is inside a tokio runtime.
pub fn run_sql_blocking(config: tokio_postgres::Config, sql: &str) -> io::Result<()> {
    let sql = sql.to_owned();
    let worker = std::thread::spawn(move || -> io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ctx(e, "building a tokio runtime".to_owned()))?;
        runtime.block_on(async {
            let (client, connection) = config
                .connect(NoTls)
                .await
                .map_err(|e| io::Error::other(format!("connecting: {}", pg_error(&e))))?;
            let connection = tokio::spawn(connection);
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| io::Error::other(pg_error(&e)))?;
            drop(client);
            let _ = connection.await;
            Ok(())
        })
    });
    worker
        .join()
        .map_err(|_| io::Error::other("the SQL worker thread panicked"))?
}

/// The server's own message when there is one (tokio-postgres' Display can be terse).
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The rows of a simple-query answer, each as (column name, text value) pairs in column
/// order; `None` for NULL.
pub fn named_rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<(String, Option<String>)>> {
    messages
        .iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, column)| (column.name().to_owned(), row.get(i).map(str::to_owned)))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}
