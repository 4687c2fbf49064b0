/*
 * The GrandChild's egress network step (nsnet.c). Internal to the C code:
 * Python builds struct nsx_net through nsexec.h.
 */
#ifndef NSPROV_NSNET_H
#define NSPROV_NSNET_H

#include "nsexec.h"

/* Add the rules, hand the namespaces over; 0, or -errno. Async-signal-safe. */
long nsx_net_setup(const struct nsx_net *net);

#endif
