//! Spec -> resolved pipeline: every stage's kind looked up and params
//! validated, inputs resolved to stages, files checked, and the DAG sorted
//! (petgraph; a cycle is reported with its path).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use petgraph::graph::{DiGraph, NodeIndex};

use crate::diag::{did_you_mean, Diagnostic, SpecErrors};
use crate::spec::{InputSpec, PipelineSpec, StageSpec};
use crate::stage::{FileDep, Registry, Stage};

/// A validated stage: kind version, the prepared stage, its file deps.
type Prepared = (u32, Box<dyn Stage>, Vec<FileDep>);

pub struct ResolvedStage {
    pub spec: StageSpec,
    pub kind_version: u32,
    pub stage: Box<dyn Stage>,
    pub files: Vec<FileDep>,
    /// Indices (into `Pipeline::stages`) of the stages this one reads.
    pub upstream: Vec<usize>,
}

impl ResolvedStage {
    pub fn name(&self) -> &str {
        &self.spec.name
    }
    pub fn inputs(&self) -> &[InputSpec] {
        &self.spec.inputs
    }
}

pub struct Pipeline {
    pub path: PathBuf,
    pub sources: crate::diag::Sources,
    pub vars: serde_json::Value,
    /// In topological order (ties broken by file order).
    pub stages: Vec<ResolvedStage>,
    /// Workspace root (commands run here; files are relative to it).
    pub root: PathBuf,
}

impl Pipeline {
    pub fn index(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name() == name)
    }

    /// `targets` plus everything upstream of them (all stages if empty), in
    /// topological order.
    pub fn closure(&self, targets: &[usize]) -> Vec<usize> {
        if targets.is_empty() {
            return (0..self.stages.len()).collect();
        }
        let mut keep = BTreeSet::new();
        let mut todo: Vec<usize> = targets.to_vec();
        while let Some(i) = todo.pop() {
            if keep.insert(i) {
                todo.extend(&self.stages[i].upstream);
            }
        }
        keep.into_iter().collect()
    }

    /// Stages downstream of `i` (not including it).
    pub fn downstream(&self, i: usize) -> Vec<usize> {
        let mut out = BTreeSet::new();
        for (j, s) in self.stages.iter().enumerate().skip(i + 1) {
            if s.upstream.iter().any(|u| *u == i || out.contains(u)) {
                out.insert(j);
            }
        }
        out.into_iter().collect()
    }
}

pub fn resolve(spec: PipelineSpec, registry: &Registry, root: &Path) -> Result<Pipeline, SpecErrors> {
    let mut errors = Vec::new();
    let names: Vec<&str> = spec.stages.iter().map(|s| s.name.as_str()).collect();
    let mut prepared: Vec<Option<Prepared>> = Vec::new();
    for st in &spec.stages {
        let Some(kind) = registry.get(&st.kind) else {
            let kinds = registry.names();
            errors.push(
                Diagnostic::new(format!("unknown stage kind `{}` in stage `{}`", st.kind, st.name), Some(st.kind_loc))
                    .maybe_hint(
                        did_you_mean(&st.kind, kinds.iter().copied())
                            .or_else(|| Some(format!("known kinds: {}", kinds.join(", ")))),
                    ),
            );
            prepared.push(None);
            continue;
        };
        match kind.prepare(&st.params) {
            Err(e) => {
                let loc = if e.path.is_empty() { st.name_loc } else { st.node.locate(&e.path, e.at_key) };
                errors
                    .push(Diagnostic::new(format!("stage `{}`: {}", st.name, e.message), Some(loc)).maybe_hint(e.hint));
                prepared.push(None);
            }
            Ok(stage) => {
                let files = stage.files();
                for f in &files {
                    let p = root.join(&f.path);
                    if !p.exists() {
                        let loc = st.node.locate(&f.at, false);
                        errors.push(
                            Diagnostic::new(
                                format!("stage `{}`: file `{}` does not exist", st.name, f.path),
                                Some(loc),
                            )
                            .hint(format!("paths are relative to the workspace root {}", root.display())),
                        );
                    }
                }
                prepared.push(Some((kind.version(), stage, files)));
            }
        }
        for inp in &st.inputs {
            if !names.contains(&inp.stage.as_str()) {
                errors.push(
                    Diagnostic::new(
                        format!("stage `{}`: input `{}` names unknown stage `{}`", st.name, inp.name, inp.stage),
                        Some(inp.loc),
                    )
                    .maybe_hint(
                        did_you_mean(&inp.stage, names.iter().copied())
                            .or_else(|| Some(format!("stages in this file: {}", names.join(", ")))),
                    ),
                );
            }
        }
    }
    if !errors.is_empty() {
        return Err(SpecErrors(errors.into_iter().map(|d| d.render(&spec.sources)).collect()));
    }

    // DAG: edge upstream -> downstream.
    let mut g: DiGraph<usize, ()> = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..spec.stages.len()).map(|i| g.add_node(i)).collect();
    let by_name: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    for (i, st) in spec.stages.iter().enumerate() {
        for inp in &st.inputs {
            let u = by_name[inp.stage.as_str()];
            if g.find_edge(nodes[u], nodes[i]).is_none() {
                g.add_edge(nodes[u], nodes[i], ());
            }
        }
    }
    if petgraph::algo::toposort(&g, None).is_err() {
        return Err(SpecErrors(vec![cycle_error(&spec, &g).render(&spec.sources)]));
    }
    // Kahn's algorithm with a stable tie-break on file order.
    let n = spec.stages.len();
    let mut indeg: Vec<usize> = (0..n).map(|i| g.neighbors_directed(nodes[i], petgraph::Incoming).count()).collect();
    let mut ready: BTreeSet<usize> = (0..n).filter(|i| indeg[*i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for m in g.neighbors_directed(nodes[i], petgraph::Outgoing) {
            let j = g[m];
            indeg[j] -= 1;
            if indeg[j] == 0 {
                ready.insert(j);
            }
        }
    }
    let pos: Vec<usize> = {
        let mut p = vec![0; n];
        for (k, i) in order.iter().enumerate() {
            p[*i] = k;
        }
        p
    };
    let name_to_orig: HashMap<String, usize> = names.iter().enumerate().map(|(i, n)| (n.to_string(), i)).collect();
    let PipelineSpec { path, sources, vars, stages: specs } = spec;
    let mut slots: Vec<Option<(StageSpec, Prepared)>> =
        specs.into_iter().zip(prepared).map(|(s, p)| Some((s, p.expect("errors returned above")))).collect();
    let stages = order
        .iter()
        .map(|&i| {
            let (spec, (kind_version, stage, files)) = slots[i].take().expect("each stage once");
            let mut upstream: Vec<usize> = spec.inputs.iter().map(|inp| pos[name_to_orig[&inp.stage]]).collect();
            upstream.sort();
            upstream.dedup();
            ResolvedStage { spec, kind_version, stage, files, upstream }
        })
        .collect::<Vec<_>>();
    Ok(Pipeline { path, sources, vars, stages, root: root.to_path_buf() })
}

fn cycle_error(spec: &PipelineSpec, g: &DiGraph<usize, ()>) -> Diagnostic {
    // The first strongly connected component with a cycle, walked in edge order.
    let scc = petgraph::algo::tarjan_scc(g)
        .into_iter()
        .find(|c| c.len() > 1 || g.find_edge(c[0], c[0]).is_some())
        .expect("toposort failed, so a cycle exists");
    let members: BTreeSet<usize> = scc.iter().map(|n| g[*n]).collect();
    let start = *members.iter().next().expect("non-empty");
    // Shortest walk along "reads from" edges (downstream -> upstream) back to start.
    let reads = |i: usize| -> Vec<usize> {
        spec.stages[i]
            .inputs
            .iter()
            .filter_map(|inp| spec.stages.iter().position(|s| s.name == inp.stage))
            .filter(|u| members.contains(u))
            .collect()
    };
    let mut prev: HashMap<usize, usize> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    'bfs: while let Some(c) = queue.pop_front() {
        for u in reads(c) {
            if u == start {
                prev.insert(start, c);
                break 'bfs;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(u) {
                e.insert(c);
                queue.push_back(u);
            }
        }
    }
    let mut path = vec![start];
    let mut cur = prev[&start];
    while cur != start {
        path.push(cur);
        cur = prev[&cur];
    }
    path[1..].reverse();
    path.push(start);
    let shown: Vec<&str> = path.iter().map(|i| spec.stages[*i].name.as_str()).collect();
    let first = &spec.stages[start];
    let second = &spec.stages[path[1]].name;
    let loc = first.inputs.iter().find(|i| &i.stage == second).map(|i| i.loc);
    Diagnostic::new(format!("dependency cycle: {} (each stage reads the next)", shown.join(" -> ")), loc)
        .hint("a stage cannot read its own output, directly or through other stages: remove one of these inputs")
}
