use anyhow::Result;
use lb_agent::bpf::{Datapath, LoadOptions, Sizes};

fn main() -> Result<()> {
    env_logger::init();
    let opts = LoadOptions {
        pin_path: None,
        sizes: Sizes {
            maglev_table_size: 251,
            service_ids: 16,
            conntrack: 1024,
            ..Sizes::default()
        },
    };
    let _dp = Datapath::load(&opts)?;
    println!("loaded");
    Ok(())
}
