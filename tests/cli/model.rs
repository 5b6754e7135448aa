//! Model-based test: random DAGs with random edits; after every edit the
//! incremental result equals a clean rebuild in a fresh workspace.

use proptest::prelude::*;

use crate::common::*;

#[derive(Debug, Clone)]
struct Dag {
    /// For each stage, the earlier stages it reads.
    inputs: Vec<Vec<usize>>,
    /// Initial var value per stage.
    values: Vec<u8>,
}

fn dag() -> impl Strategy<Value = Dag> {
    (2usize..7).prop_flat_map(|n| {
        let inputs =
            (0..n).map(|i| proptest::sample::subsequence((0..i).collect::<Vec<_>>(), 0..=i.min(2))).collect::<Vec<_>>();
        (inputs, proptest::collection::vec(0u8..3, n)).prop_map(|(inputs, values)| Dag { inputs, values })
    })
}

#[derive(Debug, Clone)]
enum Edit {
    /// Set stage i's var (values collide often, so outputs repeat: early cutoff).
    Var(usize, u8),
    /// Rewrite the shared data file.
    Data(u8),
    /// Touch the data file without changing it.
    Touch,
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    proptest::collection::vec(
        prop_oneof![
            (0usize..7, 0u8..3).prop_map(|(i, v)| Edit::Var(i, v)),
            (0u8..2).prop_map(Edit::Data),
            Just(Edit::Touch),
        ],
        1..4,
    )
}

fn render(d: &Dag) -> String {
    let mut s = String::from("vars:\n");
    for (i, v) in d.values.iter().enumerate() {
        s.push_str(&format!("  v{i}: {v}\n"));
    }
    s.push_str("stages:\n");
    for (i, ins) in d.inputs.iter().enumerate() {
        s.push_str(&format!("  s{i}:\n    kind: command\n"));
        if !ins.is_empty() {
            let m: Vec<String> = ins.iter().map(|u| format!("i{u}: s{u}")).collect();
            s.push_str(&format!("    inputs: {{{}}}\n", m.join(", ")));
        }
        // Output depends on the var (mod 2, so different values can give equal
        // outputs), on the inputs, and for stage 0 on the data file.
        let mut cmd = format!("echo $(( ${{vars.v{i}}} % 2 )) > $PIPE_OUT/o");
        for u in ins {
            cmd.push_str(&format!("; cat $PIPE_IN_I{u}/o >> $PIPE_OUT/o"));
        }
        if i == 0 {
            cmd.push_str("; cat data.txt >> $PIPE_OUT/o");
            s.push_str("    deps: [data.txt]\n");
        }
        s.push_str(&format!("    cmd: {cmd}\n"));
    }
    s
}

fn outputs(ws: &Ws) -> Vec<String> {
    ws.status_json("p.yaml")["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["output"].as_str().unwrap_or("none").to_string())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 20, .. ProptestConfig::default() })]
    #[test]
    fn incremental_equals_clean(mut d in dag(), edits in edits()) {
        let inc = Ws::new();
        inc.write("data.txt", "d0\n");
        inc.write("p.yaml", &render(&d));
        inc.ok(&["run", "p.yaml", "--jobs", "2"]);
        let mut data = "d0\n".to_string();
        for e in edits {
            match e {
                Edit::Var(i, v) => { let i = i % d.values.len(); d.values[i] = v; }
                Edit::Data(x) => data = format!("d{x}\n"),
                Edit::Touch => {}
            }
            inc.write("data.txt", &data);
            inc.write("p.yaml", &render(&d));
            inc.ok(&["run", "p.yaml", "--jobs", "2"]);
            let clean = Ws::new();
            clean.write("data.txt", &data);
            clean.write("p.yaml", &render(&d));
            clean.ok(&["run", "p.yaml"]);
            let (a, b) = (outputs(&inc), outputs(&clean));
            prop_assert!(a.iter().all(|o| o != "none"));
            prop_assert_eq!(a, b);
        }
    }
}
