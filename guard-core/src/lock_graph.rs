//! Who waits for whom, in one round trip per database: every backend waiting for a lock, the
//! backends `pg_blocking_pids` names as its blockers, and the relation locks of both. The
//! blocking budget judges this graph; an operator's view of the wait-for graph can draw it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::connections::GuardConnection;

/// Every waiting backend of the current database with its blockers, plus every blocker, with
/// their `pg_stat_activity` facts and their table-level locks (granted or awaited).
///
/// `pg_locks` is read once (each read snapshots the whole lock table); `pg_blocking_pids`
/// runs only for backends that wait. `waitstart` exists from PostgreSQL 14 on: reading it
/// through `to_jsonb` of the row gives NULL on older servers instead of failing to prepare.
/// Every function, operator and type is schema-qualified, as in the probe: this runs inside
/// databases whose owners may define look-alikes.
pub(crate) const LOCK_GRAPH_SQL: &str = "\
WITH l AS MATERIALIZED (
    SELECT l.pid, l.locktype, l.database, l.relation, l.mode, l.granted,
           (pg_catalog.to_jsonb(l) OPERATOR(pg_catalog.->>) 'waitstart')::pg_catalog.timestamptz
               AS waitstart
    FROM pg_catalog.pg_locks l
    WHERE l.pid IS NOT NULL
),
here AS MATERIALIZED (
    SELECT d.oid FROM pg_catalog.pg_database d
    WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()
),
w AS MATERIALIZED (
    SELECT DISTINCT ON (l.pid) l.pid, l.locktype, l.mode, l.relation, l.waitstart,
           pg_catalog.pg_blocking_pids(l.pid) AS blockers
    FROM l
    JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) l.pid
    WHERE NOT l.granted
      AND a.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()
    ORDER BY l.pid
),
involved AS (
    SELECT w.pid FROM w
    UNION
    SELECT pg_catalog.unnest(w.blockers) AS pid FROM w
)
SELECT a.pid,
       a.usename::pg_catalog.text,
       a.application_name,
       a.state,
       a.state_change,
       a.backend_start,
       a.client_port,
       w.locktype,
       w.mode,
       w.waitstart,
       COALESCE(w.blockers, '{}'::pg_catalog.int4[]),
       wn.nspname::pg_catalog.text,
       wc.relname::pg_catalog.text,
       COALESCE(r.schemas, '{}'::pg_catalog.text[]),
       COALESCE(r.tables, '{}'::pg_catalog.text[]),
       COALESCE(r.modes, '{}'::pg_catalog.text[]),
       COALESCE(r.granted, '{}'::pg_catalog.bool[])
FROM involved i
JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) i.pid
LEFT JOIN w ON w.pid OPERATOR(pg_catalog.=) i.pid
LEFT JOIN pg_catalog.pg_class wc
       ON wc.oid OPERATOR(pg_catalog.=) w.relation
      AND w.locktype OPERATOR(pg_catalog.=) ANY ('{relation,tuple}'::pg_catalog.text[])
LEFT JOIN pg_catalog.pg_namespace wn ON wn.oid OPERATOR(pg_catalog.=) wc.relnamespace
LEFT JOIN LATERAL (
    SELECT pg_catalog.array_agg(n.nspname::pg_catalog.text ORDER BY n.nspname, c.relname, l.mode)
               AS schemas,
           pg_catalog.array_agg(c.relname::pg_catalog.text ORDER BY n.nspname, c.relname, l.mode)
               AS tables,
           pg_catalog.array_agg(l.mode ORDER BY n.nspname, c.relname, l.mode) AS modes,
           pg_catalog.array_agg(l.granted ORDER BY n.nspname, c.relname, l.mode) AS granted
    FROM l
    JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) l.relation
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
    WHERE l.pid OPERATOR(pg_catalog.=) i.pid
      AND l.locktype OPERATOR(pg_catalog.=) 'relation'
      AND l.database OPERATOR(pg_catalog.=) (SELECT here.oid FROM here)
      AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p,v,m,f}'::pg_catalog.\"char\"[])
) r ON true";

/// A table-level lock of a backend in the graph.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct RelationLock {
    pub schema: String,
    pub table: String,
    /// As `pg_locks.mode` spells it.
    pub mode: String,
    /// False while the backend waits for it.
    pub granted: bool,
}

/// The lock a backend waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wait {
    /// `pg_locks.locktype`: `relation`, `tuple` (a row someone else also waits for),
    /// `transactionid` (a row a running transaction changed or locked), ...
    pub locktype: String,
    /// The mode asked for.
    pub mode: String,
    /// `pg_locks.waitstart` (PostgreSQL 14+; `None` before, or in the instant before the
    /// server records it).
    pub since: Option<SystemTime>,
    /// `pg_blocking_pids`: who holds, or waits ahead for, a conflicting lock.
    pub blockers: Vec<i32>,
    /// The table, when the awaited lock is on one (`relation` and `tuple` locks).
    pub table: Option<(String, String)>,
}

/// One backend of the graph: a waiter, a blocker, or both. (`Default` is a backend known by
/// nothing but its pid, which the tests of every graph reader build on.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GraphBackend {
    pub pid: i32,
    /// `pg_stat_activity.usename`.
    pub user: Option<String>,
    /// `pg_stat_activity.application_name`.
    pub application: Option<String>,
    /// `pg_stat_activity.state` (`active`, `idle in transaction`, ...).
    pub state: Option<String>,
    pub state_change: Option<SystemTime>,
    /// With `client_port`, what proves the backend is a given proxied session's.
    pub backend_start: Option<SystemTime>,
    pub client_port: Option<i32>,
    /// Table-level locks in this database, granted or awaited.
    pub relations: Vec<RelationLock>,
    /// The lock it waits for, if it waits.
    pub waiting: Option<Wait>,
}

impl GraphBackend {
    /// How long it has waited at `now` (server clock), when it waits and the server says
    /// since when.
    pub fn waited(&self, now: SystemTime) -> Option<Duration> {
        let since = self.waiting.as_ref()?.since?;
        Some(now.duration_since(since).unwrap_or(Duration::ZERO))
    }

    /// The tables its wait is about: the awaited lock's table when it names one; otherwise
    /// (a row held by another transaction is awaited as that transaction's id) the tables
    /// it already holds locks on, one of which holds the row.
    pub fn wanted_tables(&self) -> Vec<(String, String)> {
        if let Some(table) = self.waiting.as_ref().and_then(|w| w.table.clone()) {
            return vec![table];
        }
        let mut out: Vec<(String, String)> = Vec::new();
        for r in self.relations.iter().filter(|r| r.granted) {
            let t = (r.schema.clone(), r.table.clone());
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// The mode it holds `schema.table` in, when granted.
    pub fn held_mode(&self, schema: &str, table: &str) -> Option<&str> {
        self.relations
            .iter()
            .find(|r| r.granted && r.schema == schema && r.table == table)
            .map(|r| r.mode.as_str())
    }
}

/// The wait-for graph of one database at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LockGraph {
    pub backends: HashMap<i32, GraphBackend>,
}

impl LockGraph {
    /// The backends that wait, in pid order.
    pub fn waiters(&self) -> Vec<&GraphBackend> {
        let mut out: Vec<&GraphBackend> = self
            .backends
            .values()
            .filter(|b| b.waiting.is_some())
            .collect();
        out.sort_by_key(|b| b.pid);
        out
    }

    /// The heads of `pid`'s wait chains: following blockers that themselves wait, the ones
    /// that do not (they hold what everyone behind them needs). A blocker the graph does not
    /// know (another database's, or gone) counts as a head. A cycle (a deadlock the server
    /// is about to break) has no head. Sorted, without duplicates.
    pub fn heads(&self, pid: i32) -> Vec<i32> {
        let mut heads = Vec::new();
        let mut seen = HashSet::from([pid]);
        let mut queue: VecDeque<i32> = self.blockers(pid).iter().copied().collect();
        while let Some(next) = queue.pop_front() {
            if !seen.insert(next) {
                continue;
            }
            match self.backends.get(&next).and_then(|b| b.waiting.as_ref()) {
                Some(wait) => queue.extend(wait.blockers.iter().copied()),
                None => heads.push(next),
            }
        }
        heads.sort_unstable();
        heads
    }

    fn blockers(&self, pid: i32) -> &[i32] {
        self.backends
            .get(&pid)
            .and_then(|b| b.waiting.as_ref())
            .map_or(&[], |w| w.blockers.as_slice())
    }
}

/// Reads the wait-for graph of `conn`'s database.
pub async fn read(conn: &GuardConnection) -> Result<LockGraph, tokio_postgres::Error> {
    let rows = conn.query(LOCK_GRAPH_SQL, &[]).await?;
    let mut backends = HashMap::with_capacity(rows.len());
    for row in rows {
        let locktype: Option<String> = row.try_get(7)?;
        let waiting = match locktype {
            Some(locktype) => {
                let schema: Option<String> = row.try_get(11)?;
                let table: Option<String> = row.try_get(12)?;
                Some(Wait {
                    locktype,
                    mode: row.try_get::<_, Option<String>>(8)?.unwrap_or_default(),
                    since: row.try_get(9)?,
                    blockers: row.try_get(10)?,
                    table: schema.zip(table),
                })
            }
            None => None,
        };
        let schemas: Vec<String> = row.try_get(13)?;
        let tables: Vec<String> = row.try_get(14)?;
        let modes: Vec<String> = row.try_get(15)?;
        let granted: Vec<bool> = row.try_get(16)?;
        let relations = schemas
            .into_iter()
            .zip(tables)
            .zip(modes.into_iter().zip(granted))
            .map(|((schema, table), (mode, granted))| RelationLock {
                schema,
                table,
                mode,
                granted,
            })
            .collect();
        let backend = GraphBackend {
            pid: row.try_get(0)?,
            user: row.try_get(1)?,
            application: row.try_get(2)?,
            state: row.try_get(3)?,
            state_change: row.try_get(4)?,
            backend_start: row.try_get(5)?,
            client_port: row.try_get(6)?,
            relations,
            waiting,
        };
        backends.insert(backend.pid, backend);
    }
    Ok(LockGraph { backends })
}

/// How long an operator's read of the graph may take on the guard's connection.
const VIEW_DEADLINE: Duration = Duration::from_secs(2);

impl crate::guard::Guard {
    /// The wait-for graph of `database`, read over the guard's own connection to it (with
    /// its forced `search_path`), and the server's clock at that moment for the waits'
    /// ages: what an operator's view of the waits draws.
    pub async fn wait_for_graph(
        &self,
        database: &str,
    ) -> Result<(LockGraph, SystemTime), crate::GuardError> {
        let graph = self
            .connections
            .run(
                database,
                VIEW_DEADLINE,
                |conn| async move { read(&conn).await },
            )
            .await?;
        let server_now = self
            .connections
            .clock_offset(database)
            .to_server(SystemTime::now());
        Ok((graph, server_now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(pid: i32, blockers: Option<Vec<i32>>) -> GraphBackend {
        GraphBackend {
            pid,
            waiting: blockers.map(|blockers| Wait {
                locktype: "transactionid".into(),
                mode: "ShareLock".into(),
                since: None,
                blockers,
                table: None,
            }),
            ..GraphBackend::default()
        }
    }

    fn graph(list: Vec<GraphBackend>) -> LockGraph {
        LockGraph {
            backends: list.into_iter().map(|b| (b.pid, b)).collect(),
        }
    }

    #[test]
    fn the_head_of_a_chain_is_the_blocker_that_does_not_wait() {
        // 3 waits for 2, which waits for 1.
        let g = graph(vec![
            backend(1, None),
            backend(2, Some(vec![1])),
            backend(3, Some(vec![2])),
        ]);
        assert_eq!(g.heads(3), vec![1]);
        assert_eq!(g.heads(2), vec![1]);
        assert!(g.heads(1).is_empty());
        assert_eq!(
            g.waiters().iter().map(|b| b.pid).collect::<Vec<_>>(),
            [2, 3]
        );
    }

    #[test]
    fn unknown_blockers_are_heads_and_cycles_have_none() {
        let g = graph(vec![
            backend(2, Some(vec![9, 3])),
            backend(3, Some(vec![2])),
        ]);
        assert_eq!(g.heads(2), vec![9]);
        let cycle = graph(vec![backend(1, Some(vec![2])), backend(2, Some(vec![1]))]);
        assert!(cycle.heads(1).is_empty());
    }

    #[test]
    fn the_lock_graph_sql_is_schema_qualified() {
        crate::sql_check::assert_schema_qualified(LOCK_GRAPH_SQL);
    }
}
