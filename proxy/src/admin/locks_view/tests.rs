//! The graph view built from hand-made lock graphs and session records.

use super::*;
use guard_core::{RelationLock, Wait};
use lockguard_config::ClientLossAction;

fn backend(pid: i32, relations: &[(&str, &str, bool)], wait: Option<Wait>) -> GraphBackend {
    GraphBackend {
        pid,
        relations: relations
            .iter()
            .map(|(table, mode, granted)| RelationLock {
                schema: "app".into(),
                table: (*table).into(),
                mode: (*mode).into(),
                granted: *granted,
            })
            .collect(),
        waiting: wait,
        ..GraphBackend::default()
    }
}

fn waits_on(locktype: &str, table: Option<&str>, blockers: Vec<i32>) -> Option<Wait> {
    Some(Wait {
        locktype: locktype.into(),
        mode: "ShareLock".into(),
        since: None,
        blockers,
        table: table.map(|t| ("app".into(), t.into())),
    })
}

fn graph(list: Vec<GraphBackend>) -> guard_core::LockGraph {
    guard_core::LockGraph {
        backends: list.into_iter().map(|b| (b.pid, b)).collect(),
    }
}

#[test]
fn a_row_wait_on_a_protected_table_is_labelled_with_the_table_and_the_holders_mode() {
    let patterns: Vec<TablePattern> = vec!["app.user_sessions".parse().unwrap()];
    let g = graph(vec![
        backend(1, &[("user_sessions", "RowExclusiveLock", true)], None),
        // Waits on 1's transaction id; holds its own RowExclusiveLock on the table.
        backend(
            2,
            &[
                ("scratch", "AccessShareLock", true),
                ("user_sessions", "RowExclusiveLock", true),
            ],
            waits_on("transactionid", None, vec![1]),
        ),
        // Waits for a table nobody protects.
        backend(
            3,
            &[("scratch", "AccessExclusiveLock", false)],
            waits_on("relation", Some("scratch"), vec![1]),
        ),
    ]);
    assert_eq!(
        protected_waits(&g, &patterns),
        vec![PidWait {
            waiter: 2,
            holder: 1,
            table: "app.user_sessions".into(),
            mode: "RowExclusiveLock".into(),
        }]
    );
}

#[test]
fn a_chain_gives_one_edge_per_link_and_a_table_wait_keeps_the_awaited_mode() {
    let patterns: Vec<TablePattern> = vec!["app.*".parse().unwrap()];
    let g = graph(vec![
        backend(1, &[("user_sessions", "RowExclusiveLock", true)], None),
        // 2 wants the whole table; 1 holds it in a weaker mode it reports.
        backend(
            2,
            &[("user_sessions", "AccessExclusiveLock", false)],
            waits_on("relation", Some("user_sessions"), vec![1]),
        ),
        // 3 queues behind 2 (and 1); 9 is a blocker the graph does not know.
        backend(
            3,
            &[("user_sessions", "AccessShareLock", false)],
            waits_on("relation", Some("user_sessions"), vec![1, 2, 9]),
        ),
    ]);
    let edges: Vec<(i32, i32, String)> = protected_waits(&g, &patterns)
        .into_iter()
        .map(|w| (w.waiter, w.holder, w.mode))
        .collect();
    assert_eq!(
        edges,
        vec![
            (2, 1, "RowExclusiveLock".into()),
            (3, 1, "RowExclusiveLock".into()),
            (3, 2, "ShareLock".into()),
            (3, 9, "ShareLock".into()),
        ]
    );
}

fn rules() -> Rules {
    Rules {
        on_client_loss: ClientLossAction::Terminate,
        idle_in_transaction_timeout: Duration::from_secs(30),
        failed_transaction_timeout: Duration::from_secs(10),
        require_waiters: false,
        dry_run: false,
    }
}

#[test]
fn an_idle_holder_of_a_protected_lock_is_due_for_termination_when_its_timeout_runs_out() {
    let due = due_action(
        "default",
        &rules(),
        TxnState::IdleInTransaction,
        Duration::from_millis(12_500),
        1,
        0,
    );
    assert_eq!(
        due,
        Some(DueAction {
            rule: "default".into(),
            trigger: "idle_in_transaction",
            action: "terminate",
            in_s: 17.5,
        })
    );
    let overdue = due_action(
        "login",
        &rules(),
        TxnState::IdleInFailedTransaction,
        Duration::from_secs(60),
        2,
        1,
    )
    .unwrap();
    assert_eq!(
        (overdue.rule.as_str(), overdue.trigger, overdue.in_s),
        ("login", "failed_transaction", 0.0)
    );
}

#[test]
fn no_action_is_due_for_a_busy_lock_free_or_unblocking_session_or_with_the_rule_off() {
    let age = Duration::from_secs(5);
    for state in [TxnState::Active, TxnState::Idle, TxnState::Startup] {
        assert_eq!(due_action("d", &rules(), state, age, 1, 1), None);
    }
    let idle = TxnState::IdleInTransaction;
    assert_eq!(due_action("d", &rules(), idle, age, 0, 1), None);
    let off = Rules {
        idle_in_transaction_timeout: Duration::ZERO,
        ..rules()
    };
    assert_eq!(due_action("d", &off, idle, age, 1, 1), None);
    let needs_waiters = Rules {
        require_waiters: true,
        ..rules()
    };
    assert_eq!(due_action("d", &needs_waiters, idle, age, 1, 0), None);
    assert!(due_action("d", &needs_waiters, idle, age, 1, 1).is_some());
    let dry = Rules {
        dry_run: true,
        ..rules()
    };
    assert_eq!(
        due_action("d", &dry, idle, age, 1, 0).map(|d| d.action),
        Some("dry_run")
    );
}
