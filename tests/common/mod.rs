pub mod gateway;
pub mod http;
