pub mod nf4;
pub mod spectrum;
