//! The container image under `deploy/container`, built with podman, and its static binary
//! run against a real PostgreSQL.
//!
//! Skipped with a message when podman is missing, except under `CI=true`, where it fails.

mod deploy_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

use deploy_support::*;

/// Removes the image and container a test created, also when it fails.
struct PodmanCleanup {
    podman: PathBuf,
    image: String,
    container: Option<String>,
}

impl Drop for PodmanCleanup {
    fn drop(&mut self) {
        if let Some(container) = &self.container {
            let _ = Command::new(&self.podman)
                .args(["rm", "--force", container])
                .output();
        }
        let _ = Command::new(&self.podman)
            .args(["rmi", "--force", &self.image])
            .output();
    }
}

/// Builds the static binary the image takes, with the dev profile (no debug info) into its own
/// target directory: a release build from scratch costs minutes on two cores, and the
/// outer `cargo test` holds the lock on the workspace's target directory anyway.
fn build_static_binary() -> PathBuf {
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let target = target_dir().join("container-static");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    run(Command::new(cargo)
        .args(["build", "-p", "lockguard", "--bin", "lockguard", "--target"])
        .arg(&triple)
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", &target)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_PROFILE_DEV_DEBUG", "false")
        .env("CARGO_INCREMENTAL", "0")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_MAKEFLAGS")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS"));
    eprintln!("static build: {:.1}s", started.elapsed().as_secs_f64());
    target.join(triple).join("debug/lockguard")
}

/// Whether the ELF file has no program interpreter (PT_INTERP): it needs no dynamic loader.
fn is_static_elf(path: &Path) -> bool {
    let bytes = std::fs::read(path).expect("read the binary");
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i..i + 8]);
        u64::from_le_bytes(b)
    };
    assert_eq!(&bytes[..5], b"\x7fELF\x02", "a 64-bit ELF file");
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    (0..usize::from(phnum)).all(|i| {
        let header = phoff + i * usize::from(phentsize);
        u32::from_le_bytes(bytes[header..header + 4].try_into().expect("4 bytes")) != PT_INTERP
    })
}

/// Every regular file under `root`, relative to it.
fn files_under(root: &Path) -> BTreeSet<String> {
    let mut files = BTreeSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(root).expect("under root");
                files.insert(relative.to_string_lossy().into_owned());
            }
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_image_holds_a_static_binary_that_proxies_queries() {
    let Some(podman) = require("podman", "apt-get install podman") else {
        return;
    };
    let started = Instant::now();
    let binary = tokio::task::block_in_place(build_static_binary);
    assert!(is_static_elf(&binary), "{} is dynamic", binary.display());

    let tag = format!("localhost/lockguard-deploy-test:{}", std::process::id());
    let mut cleanup = PodmanCleanup {
        podman: podman.clone(),
        image: tag.clone(),
        container: None,
    };
    tokio::task::block_in_place(|| build_image(&podman, &binary, &tag));
    check_image_config(&podman, &tag);

    let scratch = tempfile::tempdir().expect("temp dir");
    let rootfs = extract_rootfs(&mut cleanup, scratch.path());
    drop(cleanup);
    check_rootfs(&rootfs);

    let image = ImageBinary::prepare(rootfs, scratch.path());
    let version = run(&mut image.command(&["--version"]));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("lockguard {}", env!("CARGO_PKG_VERSION"))
    );
    proxies_queries(&image).await;
    eprintln!(
        "container test: {:.1}s in all",
        started.elapsed().as_secs_f64()
    );
}

/// Builds the image exactly as the Containerfile documents it.
fn build_image(podman: &Path, binary: &Path, tag: &str) {
    let built = Instant::now();
    let bin_dir = binary.parent().expect("the binary's directory");
    run(Command::new(podman)
        .args(["build", "--quiet", "-f", "deploy/container/Containerfile"])
        .arg("--build-context")
        .arg(format!("bin={}", bin_dir.display()))
        .args(["--build-context", "certs=/etc/ssl/certs", "-t", tag])
        .arg("deploy/container")
        .current_dir(repo()));
    eprintln!("podman build: {:.1}s", built.elapsed().as_secs_f64());
}

/// The image: a non-root user, no HEALTHCHECK, the binary as entrypoint reading the mounted
/// configuration.
fn check_image_config(podman: &Path, tag: &str) {
    let inspect = run(Command::new(podman).args(["image", "inspect", tag]));
    let inspect: Value = serde_json::from_slice(&inspect.stdout).expect("inspect JSON");
    let image = at(&inspect, "/0/Config");
    assert_eq!(text(image, "/User"), "65532:65532");
    assert!(image.get("Healthcheck").is_none(), "{image:#}");
    assert_eq!(
        at(image, "/Entrypoint"),
        &serde_json::json!(["/usr/local/bin/lockguard"])
    );
    assert_eq!(
        at(image, "/Cmd"),
        &serde_json::json!(["--config", "/etc/lockguard/lockguard.toml"])
    );
}

/// The image's whole filesystem, taken out into `scratch/rootfs` without running it (this
/// sandbox refuses to).
fn extract_rootfs(cleanup: &mut PodmanCleanup, scratch: &Path) -> PathBuf {
    let podman = cleanup.podman.clone();
    let container = format!("lockguard-deploy-test-{}", std::process::id());
    run(Command::new(&podman).args(["create", "--name", &container, &cleanup.image]));
    cleanup.container = Some(container.clone());
    let rootfs = scratch.join("rootfs");
    std::fs::create_dir(&rootfs).expect("rootfs dir");
    let tar = scratch.join("rootfs.tar");
    run(Command::new(&podman)
        .args(["export", "-o"])
        .arg(&tar)
        .arg(&container));
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&rootfs));
    rootfs
}

/// The image holds exactly the binary, the CA certificates and the user.
fn check_rootfs(rootfs: &Path) {
    assert_eq!(
        files_under(rootfs),
        [
            "etc/group",
            "etc/passwd",
            "etc/ssl/certs/ca-certificates.crt",
            "usr/local/bin/lockguard"
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<BTreeSet<_>>(),
        "the image holds exactly the binary, CA certificates and the user"
    );
    let passwd = read_path(&rootfs.join("etc/passwd"));
    assert!(passwd.contains("lockguard:x:65532:65532:"), "{passwd}");
    assert!(
        read_path(&rootfs.join("etc/ssl/certs/ca-certificates.crt")).contains("BEGIN CERTIFICATE")
    );
}

/// The image's binary run inside its own filesystem as its own user, as the container would
/// (chroot needs root; otherwise it runs from the extracted file). What the runtime mounts is
/// written in: /etc/hosts, the configuration.
struct ImageBinary {
    rootfs: PathBuf,
    chrooted: bool,
    /// `/` as the binary sees it.
    root_prefix: PathBuf,
    /// Where what the binary sees under `/` is written.
    mount: PathBuf,
}

impl ImageBinary {
    fn prepare(rootfs: PathBuf, scratch: &Path) -> ImageBinary {
        let chrooted = running_as_root();
        let (root_prefix, mount) = if chrooted {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o755))
                .expect("chmod rootfs");
            (PathBuf::from("/"), rootfs.clone())
        } else {
            eprintln!("not root: running the image's binary outside a chroot");
            (scratch.to_path_buf(), scratch.to_path_buf())
        };
        std::fs::write(rootfs.join("etc/hosts"), "127.0.0.1 localhost\n").expect("hosts");
        if chrooted {
            // The devices every OCI runtime provides. The binary needs /dev/urandom: statically
            // linked glibc has no dlsym, so the getrandom crate falls back to reading that file.
            let dev = rootfs.join("dev");
            std::fs::create_dir(&dev).expect("dev dir");
            for (name, minor) in [
                ("null", "3"),
                ("zero", "5"),
                ("random", "8"),
                ("urandom", "9"),
            ] {
                run(Command::new("mknod")
                    .args(["-m", "666"])
                    .arg(dev.join(name))
                    .args(["c", "1", minor]));
            }
        }
        ImageBinary {
            rootfs,
            chrooted,
            root_prefix,
            mount,
        }
    }

    /// The binary with `args` and an empty environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = if self.chrooted {
            let mut c = Command::new(on_path("chroot").expect("chroot (coreutils)"));
            c.arg("--userspec=65532:65532")
                .arg(&self.rootfs)
                .arg("/usr/local/bin/lockguard");
            c
        } else {
            Command::new(self.rootfs.join("usr/local/bin/lockguard"))
        };
        command.args(args).env_clear();
        command
    }
}

/// The image's binary in front of a real PostgreSQL: the upstream is named by host name, so
/// the static binary's name lookup is exercised, and the guard's password comes from the
/// environment as the Containerfile documents. A query passes and `/readyz` says ready.
async fn proxies_queries(image: &ImageBinary) {
    let sandbox = tokio::task::block_in_place(|| {
        start_sandbox(
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
            "CREATE ROLE lockguard LOGIN PASSWORD 'guard-secret' \
                 IN ROLE pg_signal_backend, pg_read_all_stats;\n\
             CREATE ROLE app LOGIN PASSWORD 'app-secret';\n\
             CREATE SCHEMA app AUTHORIZATION app;",
        )
    });
    let config_dir = image.mount.join("etc/lockguard");
    std::fs::create_dir_all(&config_dir).expect("config dir");
    std::fs::write(
        config_dir.join("lockguard.toml"),
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"localhost:{port}\"\n\
             [log]\nformat = \"json\"\n\
             [guard]\ndsn = \"host=localhost port={port} user=lockguard dbname=postgres\"\n\
             password_env = \"LOCKGUARD_GUARD_PASSWORD\"\n\
             protected_tables = [\"app.user_sessions\"]\n\
             [admin]\nhttp_listen = \"127.0.0.1:0\"\n",
            port = sandbox.port()
        ),
    )
    .expect("write the config");
    let config_path = image.root_prefix.join("etc/lockguard/lockguard.toml");
    let config_arg = config_path.to_str().expect("UTF-8 path");
    let mut command = image.command(&["--config", config_arg]);
    command.env("LOCKGUARD_GUARD_PASSWORD", "guard-secret");
    let lockguard = Running::start(command);
    let proxy = lockguard.address_of("lockguard is accepting connections");
    let http = lockguard.address_of("admin HTTP endpoint is accepting connections");

    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(proxy.port())
        .user("app")
        .password("app-secret")
        .dbname("postgres")
        .connect_timeout(WAIT)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connect through the image's binary: {e}\n{}",
                lockguard.logs()
            )
        });
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT current_user::text, 6 * 7", &[])
        .await
        .expect("a query through the image's binary");
    assert_eq!(row.get::<_, String>(0), "app");
    assert_eq!(row.get::<_, i32>(1), 42);
    // Ready: the upstream answers and the guard logged in with the password from the
    // environment.
    let (status, body) = tokio::task::block_in_place(|| {
        std::panic::catch_unwind(|| http_get(http, "/readyz"))
            .unwrap_or_else(|_| panic!("GET /readyz failed; the log:\n{}", lockguard.logs()))
    });
    assert_eq!(status, 200, "{body}\n{}", lockguard.logs());
}
