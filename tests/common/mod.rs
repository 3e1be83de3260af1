pub mod gateway;
pub mod http;
pub mod node;
pub mod pg;
pub mod redis;
