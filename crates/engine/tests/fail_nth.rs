//! Sweeps every fallible step of a realistic sequence with injected
//! failures: each must end in a clean error and leave nothing pinned or
//! charged once the context is gone.

use ioasid_engine::inject::{current_tid, fail_nth, set_fail_nth};
use ioasid_engine::{
    AccessOps, Context, ContextConfig, DeviceInfo, HostBuffer, HwptFlags, Limit, Perm, account, pages,
};
use std::sync::Arc;

const PAGE: u64 = 4096;

struct NoDriver;
impl AccessOps for NoDriver {
    fn unmap(&self, _: u64, _: u64) {}
}

fn scenario(ctx: &Context, buf: &HostBuffer) -> ioasid_engine::Result<()> {
    let ioas = ctx.ioas_alloc()?;
    let other = ctx.ioas_alloc()?;
    let dev = ctx.bind_device(DeviceInfo::new("d", 1))?;
    let hwpt = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: false, dirty_tracking: false }, None)?;
    ctx.attach(dev, hwpt)?;
    // SAFETY: `buf` outlives every context the sweep makes.
    let iova = unsafe { ctx.map_user(ioas, buf.addr(), 64 * PAGE, None, Perm::RW)? };
    ctx.copy(other, ioas, iova, 16 * PAGE, None, Perm::R)?;
    let (_, access) = ctx.access_create(ioas, Arc::new(NoDriver), true)?;
    access.pin_pages(iova, 4 * PAGE, true)?;
    access.unpin_pages(iova, 4 * PAGE);
    ctx.replace(dev, other)?;
    ctx.get(dev)?.dma_write(0x1000, b"x").ok();
    ctx.unmap(ioas, iova, 64 * PAGE)?;
    Ok(())
}

#[test]
fn every_injected_failure_ends_clean() {
    let buf = HostBuffer::new(64 * PAGE as usize).unwrap();
    let tid = current_tid();
    let mut swept = 0;
    for n in 1..500 {
        // Charged to this process's counters (this test is alone in its
        // binary), which outlive the context: a pin left behind shows there.
        let config = ContextConfig {
            private_counter: false,
            memlock_exempt: false,
            live_capabilities: false,
            ..ContextConfig::isolated(Limit::Pages(1 << 20))
        };
        let ctx = Context::with_config(config);
        set_fail_nth(tid, n);
        let result = scenario(&ctx, &buf);
        let fired = fail_nth(tid) == 0;
        set_fail_nth(tid, 0);
        assert!(fired || result.is_ok(), "step {n}: failed without an injected failure: {result:?}");
        if result.is_ok() {
            // The copy still maps the first 16 pages: counted while it does.
            assert_eq!(pages::pin_count(buf.addr()), 1, "the copy's pin is not counted");
            assert_eq!(pages::pin_count(buf.addr() + 16 * PAGE), 0);
            assert_eq!(account::process_pages(None).1, 16);
        }
        drop(ctx);
        for page in 0..64 {
            assert_eq!(pages::pin_count(buf.addr() + page * PAGE), 0, "step {n} leaked a pin on page {page}");
        }
        assert_eq!(account::process_pages(None), (0, 0), "step {n} left pages charged or pinned");
        if !fired {
            break;
        }
        assert!(result.is_err(), "step {n}: the injected failure was swallowed");
        swept = n;
    }
    assert!(swept >= 10, "only {swept} fallible steps: the sweep tested little");
}
