//! Running SQL on a sandbox from blocking code.

use std::io;

use tokio_postgres::NoTls;

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
