//! Asks PostgreSQL, in one round trip per database, what a set of backends hold and who waits
//! behind them.

use std::collections::HashMap;
use std::time::SystemTime;

use lockguard_config::TablePattern;
use serde::Serialize;

use crate::audit::LockEvidence;
use crate::connections::GuardConnection;

/// Granted relation-level locks of the pids in `$1` (tables, views, matviews, foreign and
/// partitioned tables — not indexes or sequences, which only echo the table's lock), plus the
/// pids blocked behind each, plus what `pg_stat_activity` says about each.
///
/// `pg_locks` is read once (a materialized CTE: each read snapshots the whole lock table), and
/// `pg_blocking_pids` — which takes the lock manager's partition locks — runs only for pids
/// that are actually waiting for a lock. The lock's database must be the one we are connected
/// to: relation OIDs mean nothing elsewhere.
///
/// The probe runs inside the clients' databases, whose owners can define an `array_agg(text)`
/// or an `=` of their own: every function, operator and type here is schema-qualified (on top
/// of the `search_path` every guard connection forces, see `connections::GUARD_OPTIONS`).
/// Sorting and `DISTINCT` take the types' default operator classes, which no search path
/// changes.
pub(crate) const PROBE_SQL: &str = "\
WITH held AS MATERIALIZED (
    SELECT l.pid, l.relation, l.mode, l.granted
    FROM pg_catalog.pg_locks l
    WHERE (l.granted
           AND l.locktype OPERATOR(pg_catalog.=) 'relation'
           AND l.pid OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.int4[])
           AND l.database OPERATOR(pg_catalog.=) (
               SELECT d.oid FROM pg_catalog.pg_database d
               WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()))
       OR (NOT l.granted AND l.pid IS NOT NULL)
),
waiting AS MATERIALIZED (
    SELECT w.pid, pg_catalog.pg_blocking_pids(w.pid) AS blockers
    FROM (SELECT DISTINCT h.pid FROM held h WHERE NOT h.granted) w
)
SELECT a.pid,
       a.state,
       a.backend_start,
       a.client_port,
       COALESCE(lk.schemas, '{}'::pg_catalog.text[]),
       COALESCE(lk.tables, '{}'::pg_catalog.text[]),
       COALESCE(lk.modes, '{}'::pg_catalog.text[]),
       COALESCE(wt.waiters, '{}'::pg_catalog.int4[]),
       a.state_change
FROM pg_catalog.pg_stat_activity a
LEFT JOIN LATERAL (
    SELECT pg_catalog.array_agg(n.nspname::pg_catalog.text ORDER BY n.nspname, c.relname, h.mode)
               AS schemas,
           pg_catalog.array_agg(c.relname::pg_catalog.text ORDER BY n.nspname, c.relname, h.mode)
               AS tables,
           pg_catalog.array_agg(h.mode ORDER BY n.nspname, c.relname, h.mode) AS modes
    FROM held h
    JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) h.relation
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
    WHERE h.granted
      AND h.pid OPERATOR(pg_catalog.=) a.pid
      AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p,v,m,f}'::pg_catalog.\"char\"[])
) lk ON true
LEFT JOIN LATERAL (
    SELECT pg_catalog.array_agg(w.pid ORDER BY w.pid) AS waiters
    FROM waiting w
    WHERE a.pid OPERATOR(pg_catalog.=) ANY (w.blockers)
) wt ON true
WHERE a.pid OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.int4[])";

/// A granted lock on a table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct HeldLock {
    pub schema: String,
    pub table: String,
    /// As `pg_locks.mode` spells it, e.g. `RowShareLock`.
    pub mode: String,
}

impl HeldLock {
    /// `schema.table`, as operators write it.
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// The lock as it appears in an audit event.
    pub fn evidence(&self) -> LockEvidence {
        LockEvidence {
            table: self.qualified_table(),
            mode: self.mode.clone(),
        }
    }
}

/// What PostgreSQL says about one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendFacts {
    pub pid: i32,
    /// `pg_stat_activity.state`; `None` when the guard role may not see it (it needs
    /// `pg_read_all_stats`).
    pub state: Option<String>,
    /// When `state` began: a kill for an idle rule requires it unchanged, so a transaction
    /// that ended (and a new one that began) since the probe is never the one killed.
    pub state_change: Option<SystemTime>,
    pub backend_start: Option<SystemTime>,
    /// `pg_stat_activity.client_port`: the TCP port of the backend's client (our upstream
    /// socket), `-1` for a unix socket, `None` if not visible.
    pub client_port: Option<i32>,
    /// Granted locks on protected tables only.
    pub locks: Vec<HeldLock>,
    /// Pids blocked behind this backend (`pg_blocking_pids` contains it).
    pub waiters: Vec<i32>,
}

/// Probes `pids` on `conn` (all in its database). Pids missing from the result are not in
/// `pg_stat_activity`. Locks on tables no pattern protects are dropped.
pub async fn probe(
    conn: &GuardConnection,
    pids: &[i32],
    protected: &[TablePattern],
) -> Result<HashMap<i32, BackendFacts>, tokio_postgres::Error> {
    let rows = conn.query(PROBE_SQL, &[&pids]).await?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        let schemas: Vec<String> = row.try_get(4)?;
        let tables: Vec<String> = row.try_get(5)?;
        let modes: Vec<String> = row.try_get(6)?;
        let locks = schemas
            .into_iter()
            .zip(tables)
            .zip(modes)
            .filter(|((schema, table), _)| protected.iter().any(|p| p.matches(schema, table)))
            .map(|((schema, table), mode)| HeldLock {
                schema,
                table,
                mode,
            })
            .collect();
        let facts = BackendFacts {
            pid: row.try_get(0)?,
            state: row.try_get(1)?,
            state_change: row.try_get(8)?,
            backend_start: row.try_get(2)?,
            client_port: row.try_get(3)?,
            locks,
            waiters: row.try_get(7)?,
        };
        out.insert(facts.pid, facts);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_sql_is_schema_qualified() {
        crate::sql_check::assert_schema_qualified(PROBE_SQL);
    }
}
