//! The shipped pipelines (`pipelines/*.yaml`) validate: `pipe run --dry-run`
//! plans every stage, offline (hub sources report that they cannot be
//! resolved, and nothing leaves the machine).

use std::path::Path;

use crate::common::Ws;

fn copy_dir(from: &Path, to: &Path) {
    fs_err::create_dir_all(to).unwrap();
    for e in fs_err::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            fs_err::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn the_shipped_pipelines_validate_offline() {
    let ws = Ws::new();
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines"), &ws.path().join("pipelines"));
    for (file, stages) in [
        ("pipelines/quickstart.yaml", &["smollm2_gguf", "sft", "serve_tuned", "eval_tuned", "heldout_base"][..]),
        ("pipelines/math.yaml", &["orca_math", "sft", "merged", "server", "eval"][..]),
        ("pipelines/math_spectrum.yaml", &["orca_math", "sft", "server", "eval"][..]),
    ] {
        let out = ws
            .cmd(&["run", "--dry-run", file])
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .expect("run pipe");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{file}\n{stdout}\n{stderr}");
        for s in stages {
            assert!(
                stdout.contains(&format!("would run  {s}:")) || stderr.contains(&format!("would run  {s}:")),
                "{file}: {s}\n{stdout}{stderr}"
            );
        }
    }
    // A service is planned for the stages that use it.
    let out = ws.ok(&["run", "--dry-run", "pipelines/quickstart.yaml"]);
    assert!(out.stdout.contains("would run  serve_base: service, started for eval_base, heldout_base"), "{out:?}");
    // Vars can be overridden from the command line.
    let out = ws.pipe(&["run", "--dry-run", "pipelines/quickstart.yaml", "--set", "vars.lora_r=32"]);
    assert_eq!(out.code, 0, "{out:?}");
}

/// The README's pipeline reference has a section for every stage kind.
#[test]
fn readme_documents_every_stage_kind() {
    let readme = fs_err::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let missing: Vec<_> =
        pipe_stages::registry().names().into_iter().filter(|k| !readme.contains(&format!("### `{k}`"))).collect();
    assert!(missing.is_empty(), "README.md has no `### `kind`` section for {missing:?}");
}
