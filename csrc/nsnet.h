/*
 * The GrandChild's egress network step (nsnet.c), inside the helper.
 */
#ifndef NSPROV_NSNET_H
#define NSPROV_NSNET_H

#include "nsstage.h"

/* plan->net: add the rules, hand the namespaces over; 0, or -errno. */
long nsx_net_setup(const struct nsx_start *start);

/* Wait until the Parent says the stack is up (nsx_net_setup ran); 0, or -errno. */
long nsx_net_wait(const struct nsx_start *start);

#endif
