//! Every built-in stage kind, in one place.

use pipe_engine::stage::Registry;

pub fn registry() -> Registry {
    let mut r = Registry::default();
    r.register(Box::new(crate::command::CommandKind));
    r.register(Box::new(crate::dataset::DatasetKind));
    r.register(Box::new(crate::messages::MessagesKind));
    r.register(Box::new(crate::pack::PackKind));
    r.register(Box::new(crate::model::ModelKind));
    r.register(Box::new(crate::train::TrainKind));
    r.register(Box::new(crate::merge::MergeKind));
    r.register(Box::new(crate::serve::ServeKind));
    r.register(Box::new(crate::evaluate::EvaluateKind));
    r
}
