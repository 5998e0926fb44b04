/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * ioasid extensions to the iommufd ABI: PASID allocation in IOASID sets,
 * vIOMMUs that draw their guest's PASIDs from a set, and devices for back
 * ends in other processes (under `ioasid serve`).
 *
 * These ioctls are issued on an open /dev/iommu (under `ioasid run`). They
 * use their own ioctl type byte, 'i', so they can never collide with
 * iommufd's or VFIO's commands (type ';'). Structs follow iommufd's rules:
 * the first u32 is the size; a size below the minimum is EINVAL, non-zero
 * bytes past what ioasid understands are E2BIG, unknown numbers ENOTTY.
 *
 * Ownership: PASIDs come from one space shared by every open /dev/iommu,
 * but each set belongs to the context (the open /dev/iommu) that allocated
 * it, and so do the PASIDs allocated in it. Sets are named by that
 * context's object IDs, so no other context can name them; and a PASID of
 * another context's set, given by number to PASID_GET or PASID_PUT, is not
 * found (ENOENT), as iommufd answers for another context's objects. There
 * is no way to share a set between contexts. A context's PASID_GET
 * references are its own: PASID_PUT drops only one it took (EINVAL when it
 * holds none; a PASID's allocation is dropped by PASID_FREE alone), and
 * closing the context drops every reference it still holds.
 *
 * Errors: ENOENT (no such set or PASID, or another context's), EDQUOT (a quota along the set's
 * path is full), ENOSPC (no free PASID in range), EEXIST (the set already
 * uses that private ID), EBUSY (child sets exist, or a quota below use),
 * EINVAL (bad range or width, a quota above the parent's).
 */
#ifndef _IOASID_IOASID_H
#define _IOASID_IOASID_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define IOASID_TYPE ('i')

enum {
	IOASID_CMD_SET_ALLOC = 0x00,
	IOASID_CMD_SET_QUOTA = 0x01,
	IOASID_CMD_SET_USAGE = 0x02,
	IOASID_CMD_PASID_ALLOC = 0x03,
	IOASID_CMD_PASID_FREE = 0x04,
	IOASID_CMD_PASID_GET = 0x05,
	IOASID_CMD_PASID_PUT = 0x06,
	IOASID_CMD_PASID_FIND = 0x07,
	IOASID_CMD_VPASID_LOOKUP = 0x08,
	IOASID_CMD_VIOMMU_SET_PASIDS = 0x09,
	IOASID_CMD_VDEVICE_ATTACH_PASID = 0x0a,
	IOASID_CMD_VDEVICE_DETACH_PASID = 0x0b,
	IOASID_CMD_DEVICE_NEW = 0x0c,
	IOASID_CMD_DEVICE_ATTACH = 0x0d,
	IOASID_CMD_DEVICE_DETACH = 0x0e,
};

/*
 * Allocate a set holding at most @quota PASIDs, inside set @parent_id's
 * quota (0: a top-level set). The set is an object of the context:
 * IOMMU_DESTROY frees it and all its PASIDs (EBUSY while it has children).
 */
struct ioasid_set_alloc {
	__u32 size;
	__u32 flags;		/* must be 0 */
	__u32 parent_id;
	__u32 quota;
	__u32 out_set_id;
	__u32 __reserved;
};
#define IOASID_SET_ALLOC _IO(IOASID_TYPE, IOASID_CMD_SET_ALLOC)

/* Change a quota live; never below what the set uses. */
struct ioasid_set_quota {
	__u32 size;
	__u32 set_id;
	__u32 quota;
	__u32 __reserved;
};
#define IOASID_SET_QUOTA _IO(IOASID_TYPE, IOASID_CMD_SET_QUOTA)

/* A set's quota and the PASIDs used by it and its descendants. */
struct ioasid_set_usage {
	__u32 size;
	__u32 set_id;
	__u32 out_quota;
	__u32 out_used;
};
#define IOASID_SET_USAGE _IO(IOASID_TYPE, IOASID_CMD_SET_USAGE)

enum ioasid_pasid_alloc_flags {
	/* Allocate a host PASID for the set's own ID @vpasid (a guest's). */
	IOASID_PASID_ALLOC_PRIVATE = 1 << 0,
};

/* Allocate a PASID in [@min, @max] for a set, with opaque @private data. */
struct ioasid_pasid_alloc {
	__u32 size;
	__u32 flags;
	__u32 set_id;
	__u32 min;
	__u32 max;
	__u32 vpasid;
	__aligned_u64 private_data;
	__u32 out_pasid;
	__u32 __reserved;
};
#define IOASID_PASID_ALLOC _IO(IOASID_TYPE, IOASID_CMD_PASID_ALLOC)

/* Free a set's PASID: at once, or at the last PUT while referenced. */
struct ioasid_pasid_free {
	__u32 size;
	__u32 set_id;
	__u32 pasid;
	__u32 __reserved;
};
#define IOASID_PASID_FREE _IO(IOASID_TYPE, IOASID_CMD_PASID_FREE)

/*
 * Take or drop a reference on a PASID of one of this context's sets (ENOENT
 * for any other PASID; GET is ENOENT once the PASID is freed, PUT is EINVAL
 * without a reference this context took).
 */
struct ioasid_pasid_ref {
	__u32 size;
	__u32 pasid;
};
#define IOASID_PASID_GET _IO(IOASID_TYPE, IOASID_CMD_PASID_GET)
#define IOASID_PASID_PUT _IO(IOASID_TYPE, IOASID_CMD_PASID_PUT)

/* The private data of a set's PASID. */
struct ioasid_pasid_find {
	__u32 size;
	__u32 set_id;
	__u32 pasid;
	__u32 __reserved;
	__aligned_u64 out_private_data;
};
#define IOASID_PASID_FIND _IO(IOASID_TYPE, IOASID_CMD_PASID_FIND)

/* The host PASID for a set's own ID, and back. */
struct ioasid_vpasid_lookup {
	__u32 size;
	__u32 set_id;
	__u32 vpasid;
	__u32 out_pasid;
};
#define IOASID_VPASID_LOOKUP _IO(IOASID_TYPE, IOASID_CMD_VPASID_LOOKUP)

/*
 * Give vIOMMU @viommu_id (from IOMMU_VIOMMU_ALLOC) the set its guest's
 * PASIDs are drawn from. Once only (EBUSY after); the set stays busy while
 * the vIOMMU exists.
 */
struct ioasid_viommu_set_pasids {
	__u32 size;
	__u32 viommu_id;
	__u32 set_id;
	__u32 __reserved;
};
#define IOASID_VIOMMU_SET_PASIDS _IO(IOASID_TYPE, IOASID_CMD_VIOMMU_SET_PASIDS)

/*
 * Attach the device behind vDEVICE @vdevice_id at the guest's @vpasid to
 * @pt_id (an IOAS or HWPT). The device is attached at the host PASID the
 * vIOMMU's set maps @vpasid to, allocated against the set's quota on first
 * use (EDQUOT past it) and shared with the guest's other devices; it is
 * returned in @out_pasid. Page requests from it carry @vpasid. EINVAL when
 * the vIOMMU has no set, EBUSY when already attached at @vpasid.
 */
struct ioasid_vdevice_attach_pasid {
	__u32 size;
	__u32 flags;		/* must be 0 */
	__u32 vdevice_id;
	__u32 vpasid;
	__u32 pt_id;
	__u32 out_pasid;
};
#define IOASID_VDEVICE_ATTACH_PASID _IO(IOASID_TYPE, IOASID_CMD_VDEVICE_ATTACH_PASID)

/* Undo IOASID_VDEVICE_ATTACH_PASID; the last user frees the host PASID. */
struct ioasid_vdevice_detach_pasid {
	__u32 size;
	__u32 vdevice_id;
	__u32 vpasid;
	__u32 __reserved;
};
#define IOASID_VDEVICE_DETACH_PASID _IO(IOASID_TYPE, IOASID_CMD_VDEVICE_DETACH_PASID)

/*
 * Make an emulated device in this context for a back end in another
 * process: a device at requester ID @rid (bus << 8 | devfn) behind the
 * IOMMU @iommu names (an IOMMU_HW_INFO_TYPE_*: 0 or INTEL_VTD for VT-d,
 * ARM_SMMUV3, AMD, SELFTEST), with a PASID capability of @pasid_bits (0:
 * none). @out_dev_id is its device ID (for HWPT_ALLOC, VDEVICE_ALLOC, ...),
 * @out_fd its file: pass it to the back end (SCM_RIGHTS), which opens a port
 * on it through ioasid serve (the ioasid-client crate). Closing the file
 * everywhere unbinds the device. Reading the file gives one
 * struct ioasid_backend_event per read, once a back end has been cut off or
 * its port closed (EAGAIN when none waits).
 */
#define IOASID_DEVICE_PRI (1 << 0)	/* PCIe PRI: a DMA that misses asks for the page */
#define IOASID_DEVICE_DIRTY (1 << 1)	/* its IOMMU tracks dirty pages */

struct ioasid_device_new {
	__u32 size;
	__u32 flags;		/* IOASID_DEVICE_* */
	__u32 iommu;
	__u32 rid;
	__u32 pasid_bits;
	__u32 __reserved;
	__u32 out_dev_id;
	__s32 out_fd;
};
#define IOASID_DEVICE_NEW _IO(IOASID_TYPE, IOASID_CMD_DEVICE_NEW)

/*
 * Attach the device at its RID (or at @pasid, with IOASID_DEVICE_PASID) to
 * IOAS or HWPT @pt_id, replacing what is attached there, as
 * VFIO_DEVICE_ATTACH_IOMMUFD_PT does; @pt_id becomes the HWPT's ID. DETACH
 * detaches it there. Like unmap, both return once no DMA of the device's
 * back ends can use the old translation.
 */
#define IOASID_DEVICE_PASID (1 << 0)

struct ioasid_device_attach {
	__u32 size;
	__u32 flags;		/* IOASID_DEVICE_PASID */
	__u32 dev_id;
	__u32 pasid;
	__u32 pt_id;
	__u32 __reserved;
};
#define IOASID_DEVICE_ATTACH _IO(IOASID_TYPE, IOASID_CMD_DEVICE_ATTACH)

struct ioasid_device_detach {
	__u32 size;
	__u32 flags;		/* IOASID_DEVICE_PASID */
	__u32 dev_id;
	__u32 pasid;
};
#define IOASID_DEVICE_DETACH _IO(IOASID_TYPE, IOASID_CMD_DEVICE_DETACH)

/*
 * An event on a device file. IOASID_BACKEND_CUT_OFF: the back end stayed
 * inside a DMA past the daemon's bound (ioasid serve --backend-stall-ms)
 * while an unmap, detach or replace waited for it, and was killed.
 * IOASID_BACKEND_GONE: its port closed (it ended, or closed its connection).
 */
#define IOASID_BACKEND_CUT_OFF 1
#define IOASID_BACKEND_GONE 2

struct ioasid_backend_event {
	__u32 kind;
	__u32 pid;
	__u32 pasid;		/* 0xffffffff: the RID */
	__u32 __reserved;
};

#endif
