/*
 * The GrandChild's mount operations (nsmount.c), one struct nsx_mount each.
 * Internal to the C code: Python plans the table through nsexec.h.
 */
#ifndef NSPROV_NSMOUNT_H
#define NSPROV_NSMOUNT_H

#include "nsexec.h"

/* Run one operation of the plan; 0, or -errno on failure. */
long nsx_run_mount_op(const struct nsx_plan *plan, const struct nsx_mount *m);

/* What the operation is called in an error record ("bind", "mkdir", ...). */
const char *nsx_mount_op_name(int op);

#endif
