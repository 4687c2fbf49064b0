/*
 * The entry of the clone stages (nsexec.c), for the Parent's side of the C
 * code (nsclone.c). Not part of the cffi interface.
 */
#ifndef NSPROV_NSEXEC_STAGES_H
#define NSPROV_NSEXEC_STAGES_H

/* The Child's main: arg is the struct nsx_config. Never returns. */
int nsx_run_child(void *arg);

#endif
