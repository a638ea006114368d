//! Reading a one-value answer, for tests that only need to see that a session works.

use tokio_postgres::Client;

/// The single text value `sql` returns; panics with the statement and the error otherwise.
pub async fn ask(client: &Client, sql: &str) -> String {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}
