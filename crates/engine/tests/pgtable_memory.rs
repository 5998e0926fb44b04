//! What page tables cost in memory: a gigabyte mapped in 4 KiB pages needs
//! 513 tables of 4 KiB (512 leaf tables and the one above them), and their
//! dirty bits only once dirty tracking writes them. Measured as the process's resident memory,
//! alone in its test binary so nothing else allocates meanwhile.

use ioasid_engine::{Context, ContextConfig, DeviceInfo, HostBuffer, Limit, Perm};

fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = status.lines().find_map(|l| l.strip_prefix("RssAnon:")).expect("RssAnon in /proc/self/status");
    kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

#[test]
fn a_gigabyte_of_small_pages_costs_its_tables() {
    let mem = HostBuffer::new((1 << 30) + (2 << 20)).unwrap();
    let start = (mem.addr() + (2 << 20) - 1) & !((2 << 20) - 1);
    let ctx = Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX)));
    let ioas = ctx.ioas_alloc().unwrap();
    ctx.get(ioas).unwrap().set_huge_pages(false).unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("memory", 1)).unwrap();
    let hwpt = ctx.attach(dev, ioas).unwrap();
    let before = resident();
    // SAFETY: `mem` outlives the context.
    unsafe { ctx.map_user(ioas, start, 1 << 30, Some(1 << 32), Perm::RW).unwrap() };
    let grown = resident() - before;
    let tables = ctx.get(hwpt.paging()).unwrap().domain().summary().tables.iter().sum::<u64>();
    assert!(tables >= 513, "{tables} tables");
    // The tables' pages, and a little for the IOAS's own records of the
    // mapping.
    let bound = 513 * 4096 + 64 * 1024;
    assert!(grown <= bound, "{grown} bytes resident for 1 GiB of 4 KiB pages (at most {bound})");
}
