-- lockguard: the guard's role and its secret lookup, with no superuser for lockguard itself.
--
-- Run it as a superuser in the database the guard's dsn names (its `dbname`, usually
-- `postgres`), for example:
--
--     lockguard setup-sql | psql -v ON_ERROR_STOP=1 "dbname=postgres user=postgres"
--
-- then give the role a way to log in (a password: \password {{role}}, or a pg_hba.conf
-- line). Running it again is harmless: it creates what is missing and re-grants the rest.
-- The guard's auth_query for this schema: {{auth_query}}
--
-- What the role gets, and why:
-- * pg_signal_backend: pg_terminate_backend on other roles' backends (never a superuser's);
-- * pg_read_all_stats: the client_port, backend_start and state of every backend in
--   pg_stat_activity, which every kill verifies before it signals;
-- * EXECUTE on {{schema}}.scram_verifier(text) only: the SCRAM secret of a role, for
--   clients lockguard authenticates itself (SCRAM over TLS on both sides). The function runs
--   as its owner (a superuser) with its search_path pinned, and hands out SCRAM secrets only:
--   an md5 hash is as good as the password itself, a SCRAM secret is not.

BEGIN;

-- The names, as values, so the blocks below never splice them into their own text.
SELECT pg_catalog.set_config('lockguard_setup.role', {{role_literal}}, true),
       pg_catalog.set_config('lockguard_setup.schema', {{schema_literal}}, true);

DO $setup$
DECLARE
    guard_role pg_catalog.text := pg_catalog.current_setting('lockguard_setup.role');
    is_super pg_catalog.bool;
BEGIN
    IF NOT pg_catalog.current_setting('is_superuser')::pg_catalog.bool THEN
        RAISE EXCEPTION 'lockguard setup must run as a superuser: the lookup function reads '
            'pg_authid with its owner''s rights';
    END IF;
    SELECT r.rolsuper INTO is_super
    FROM pg_catalog.pg_roles r
    WHERE r.rolname OPERATOR(pg_catalog.=) guard_role;
    IF NOT FOUND THEN
        EXECUTE pg_catalog.format('CREATE ROLE %I LOGIN', guard_role);
    ELSIF is_super THEN
        RAISE WARNING 'role % is a superuser; lockguard needs none of that (ALTER ROLE % NOSUPERUSER)',
            guard_role, guard_role;
    END IF;
END
$setup$;

GRANT pg_signal_backend, pg_read_all_stats TO {{role}};

CREATE SCHEMA IF NOT EXISTS {{schema}};

-- A schema that existed before must belong to a superuser: its owner could otherwise replace
-- the function below and read every secret.
DO $setup$
DECLARE
    schema_name pg_catalog.text := pg_catalog.current_setting('lockguard_setup.schema');
    owner_is_super pg_catalog.bool;
BEGIN
    SELECT r.rolsuper INTO owner_is_super
    FROM pg_catalog.pg_namespace n
    JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) n.nspowner
    WHERE n.nspname OPERATOR(pg_catalog.=) schema_name;
    IF owner_is_super IS NOT TRUE THEN
        RAISE EXCEPTION 'schema % exists and is not owned by a superuser; choose another '
            'schema (lockguard setup-sql --schema NAME) or hand it to a superuser', schema_name;
    END IF;
END
$setup$;

REVOKE ALL ON SCHEMA {{schema}} FROM PUBLIC;
GRANT USAGE ON SCHEMA {{schema}} TO {{role}};

CREATE OR REPLACE FUNCTION {{schema}}.scram_verifier(role_name pg_catalog.text)
RETURNS pg_catalog.text
LANGUAGE sql
STABLE STRICT
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $lookup$
    SELECT a.rolpassword
    FROM pg_catalog.pg_authid a
    WHERE a.rolname OPERATOR(pg_catalog.=) role_name
      AND pg_catalog.starts_with(a.rolpassword, 'SCRAM-SHA-256$')
$lookup$;

ALTER FUNCTION {{schema}}.scram_verifier(pg_catalog.text) OWNER TO CURRENT_USER;
REVOKE ALL ON FUNCTION {{schema}}.scram_verifier(pg_catalog.text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {{schema}}.scram_verifier(pg_catalog.text) TO {{role}};

COMMIT;
