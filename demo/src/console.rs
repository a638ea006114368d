//! The admin console, as psql would use it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use lockguard_sandbox::{named_rows, pg_error};
use tokio_postgres::Client;

use crate::sessions::connect;
use crate::EVENT_WAIT;

/// The admin console, as psql would use it.
pub(crate) struct Console {
    client: Client,
}

impl Console {
    pub(crate) async fn connect(addr: SocketAddr) -> anyhow::Result<Console> {
        let (client, _connection) = connect(addr, "lockguard-demo").await?;
        Ok(Console { client })
    }

    async fn rows(&self, command: &str) -> anyhow::Result<Vec<Vec<(String, String)>>> {
        let messages = self
            .client
            .simple_query(command)
            .await
            .map_err(|e| anyhow!("admin console {command}: {}", pg_error(&e)))?;
        // NULL shows as an empty value, as psql shows it.
        Ok(named_rows(&messages)
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|(name, value)| (name, value.unwrap_or_default()))
                    .collect()
            })
            .collect())
    }

    /// The row of `command` whose `application_name` is `application`.
    pub(crate) async fn row_of(
        &self,
        command: &str,
        application: &str,
    ) -> anyhow::Result<Vec<(String, String)>> {
        self.rows(command)
            .await?
            .into_iter()
            .find(|row| {
                row.iter()
                    .any(|(name, value)| name == "application_name" && value == application)
            })
            .ok_or_else(|| anyhow!("{command} shows no client named {application}"))
    }

    /// The newest `SHOW EVENTS` row about `backend_pid`. The guard records its event right
    /// after the kill, which may be a moment after the freed login completes, so this waits
    /// up to [`EVENT_WAIT`] before concluding there is none.
    pub(crate) async fn event_about(
        &self,
        backend_pid: i32,
    ) -> anyhow::Result<Option<Vec<(String, String)>>> {
        let pid = backend_pid.to_string();
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            let found = self
                .rows("SHOW EVENTS")
                .await?
                .into_iter()
                .find(|row| column(row, "backend_pid") == Some(pid.as_str()));
            if found.is_some() || Instant::now() > deadline {
                return Ok(found);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn first_row(&self, command: &str) -> anyhow::Result<Vec<(String, String)>> {
        self.rows(command)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("{command} returned no rows"))
    }
}

/// The value of column `name` in a console row.
pub(crate) fn column<'a>(row: &'a [(String, String)], name: &str) -> Option<&'a str> {
    row.iter()
        .find(|(column, _)| column == name)
        .map(|(_, value)| value.as_str())
}
