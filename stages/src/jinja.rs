//! One minijinja environment for every template and expression users write
//! (messages mappings, dataset filters, chat templates), with the
//! Python-compatible methods HF templates use (`.strip()`, `.startswith()`...).

use minijinja::{Environment, UndefinedBehavior};

pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env
}
