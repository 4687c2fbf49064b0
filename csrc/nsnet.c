/*
 * network = "egress", inside the sandbox's new network namespace.
 *
 * The user-mode stack (pasta, started by the Parent) turns every connection
 * the sandbox makes into a connection from the host, so what the host may
 * reach the sandbox would reach too. Policy-routing rules stop that here:
 * one "prohibit" rule per denied range, at a priority ahead of the main
 * table, so that no route pasta (or anyone) adds later can win over them,
 * however specific (a longest-prefix "unreachable" route would lose to the
 * host's subnet route that pasta copies in). connect() to a denied address
 * fails at once with EACCES and no packet reaches the stack. The sandbox
 * drops CAP_NET_ADMIN before its command runs, so the rules stay.
 *
 * Then the GrandChild sends its network and user namespaces to the Parent
 * (SCM_RIGHTS): opening /proc/<pid>/ns/... from outside needs ptrace access,
 * which a non-dumpable sandbox refuses to an unprivileged server. The rest
 * of the sandbox is set up while pasta starts. With net->wait, before the
 * command runs, nsx_net_wait() waits for the Parent's one byte saying pasta
 * is up, so that the command starts with its network in place (EOF: the
 * Parent gave up). Without it (a Jupyter kernel, whose code arrives only
 * after the Parent hands it over, once pasta is up) the kernel starts while
 * pasta does.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fib_rules.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nsnet.h"

/* Rules run in priority order; the local table's rule is 0, main's 32766. */
#define NSX_RULE_PRIO_DNS 10
#define NSX_RULE_PRIO_DENY 11

struct rule_msg {
    struct nlmsghdr nh;
    struct fib_rule_hdr frh;
    char attrs[64];
};

static void add_attr(struct rule_msg *m, unsigned short type, const void *data,
                     unsigned short len)
{
    struct nlattr *a = (struct nlattr *)((char *)m + NLMSG_ALIGN(m->nh.nlmsg_len));

    a->nla_type = type;
    a->nla_len = (unsigned short)(NLA_HDRLEN + len);
    memcpy((char *)a + NLA_HDRLEN, data, len);
    m->nh.nlmsg_len = NLMSG_ALIGN(m->nh.nlmsg_len) + NLA_ALIGN(a->nla_len);
}

/* Send one request and wait for its acknowledgement: 0, or -errno. */
static long talk(int sock, struct rule_msg *m)
{
    union {
        struct nlmsghdr nh;
        char buf[512];
    } reply;
    struct nlmsgerr *err;
    long n;

    if (send(sock, m, m->nh.nlmsg_len, 0) < 0)
        return -errno;
    do {
        n = recv(sock, &reply, sizeof(reply), 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    if ((size_t)n < NLMSG_HDRLEN + sizeof(*err) || reply.nh.nlmsg_type != NLMSG_ERROR)
        return -EPROTO;
    err = (struct nlmsgerr *)NLMSG_DATA(&reply.nh);
    return err->error;
}

static long add_rule(int sock, const struct nsx_net_range *r, int dns, unsigned seq)
{
    struct rule_msg m;
    unsigned int prio = dns ? NSX_RULE_PRIO_DNS : NSX_RULE_PRIO_DENY;
    unsigned char proto = IPPROTO_UDP;
    struct fib_rule_port_range port = {53, 53};

    if ((r->family != AF_INET && r->family != AF_INET6) || r->prefix < 0
        || r->prefix > (r->family == AF_INET ? 32 : 128))
        return -EINVAL;
    memset(&m, 0, sizeof(m));
    m.nh.nlmsg_len = NLMSG_LENGTH(sizeof(m.frh));
    m.nh.nlmsg_type = RTM_NEWRULE;
    m.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    m.nh.nlmsg_seq = seq;
    m.frh.family = (unsigned char)r->family;
    m.frh.dst_len = (unsigned char)r->prefix;
    if (dns) {
        m.frh.action = FR_ACT_TO_TBL;
        m.frh.table = RT_TABLE_MAIN;
    } else {
        m.frh.action = FR_ACT_PROHIBIT;
    }
    add_attr(&m, FRA_PRIORITY, &prio, sizeof(prio));
    if (r->prefix > 0)
        add_attr(&m, FRA_DST, r->addr, r->family == AF_INET ? 4 : 16);
    if (dns) {
        add_attr(&m, FRA_IP_PROTO, &proto, sizeof(proto));
        add_attr(&m, FRA_DPORT_RANGE, &port, sizeof(port));
    }
    return talk(sock, &m);
}

static const struct nsx_net_range *ranges(const struct nsx_plan *plan, uint32_t offset,
                                          int32_t n)
{
    if (n < 0 || n > 4096 || (offset % 4) ||
        (uint64_t)offset + sizeof(struct nsx_net_range) * (uint64_t)n > plan->size)
        return NULL;
    return (const struct nsx_net_range *)((const char *)plan + offset);
}

static long add_rules(const struct nsx_plan *plan, const struct nsx_net *net)
{
    const struct nsx_net_range *deny = ranges(plan, net->deny, net->n_deny);
    const struct nsx_net_range *dns = ranges(plan, net->dns, net->n_dns);
    unsigned seq = 1;
    long rc = 0;
    int sock, i;

    if ((net->n_deny && !deny) || (net->n_dns && !dns))
        return -EPROTO;
    sock = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (sock < 0)
        return -errno;
    for (i = 0; rc >= 0 && i < net->n_dns; i++)
        rc = add_rule(sock, &dns[i], 1, seq++);
    for (i = 0; rc >= 0 && i < net->n_deny; i++)
        rc = add_rule(sock, &deny[i], 0, seq++);
    close(sock);
    return rc;
}

static long send_namespaces(int sock)
{
    int fds[2];
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(fds))];
    } control;
    struct msghdr msg;
    struct cmsghdr *cmsg;
    struct iovec iov;
    char tag = 'n';
    long rc;

    if ((fds[0] = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC)) < 0)
        return -errno;
    if ((fds[1] = open("/proc/self/ns/user", O_RDONLY | O_CLOEXEC)) < 0) {
        rc = -errno;
        close(fds[0]);
        return rc;
    }
    memset(&control, 0, sizeof(control));
    memset(&msg, 0, sizeof(msg));
    iov.iov_base = &tag;
    iov.iov_len = 1;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(fds));
    memcpy(CMSG_DATA(cmsg), fds, sizeof(fds));
    do {
        rc = nsx_rc(sendmsg(sock, &msg, MSG_NOSIGNAL));
    } while (rc == -EINTR);
    close(fds[0]);
    close(fds[1]);
    return rc < 0 ? rc : 0;
}

long nsx_net_setup(const struct nsx_start *start)
{
    const struct nsx_plan *plan = start->plan;
    const struct nsx_net *net = (const struct nsx_net *)((const char *)plan + plan->net);
    long rc;
    int sock;

    if ((plan->net % 4) || (uint64_t)plan->net + sizeof(*net) > plan->size ||
        net->ns_sock >= start->n_fds)
        return -EPROTO;
    if ((rc = add_rules(plan, net)) < 0 || net->ns_sock < 0)
        return rc;  /* no stack (strict = false): loopback only */
    sock = start->fds[net->ns_sock];
    rc = send_namespaces(sock);
    if (!net->wait)
        close(sock);
    return rc;
}

long nsx_net_wait(const struct nsx_start *start)
{
    const struct nsx_plan *plan = start->plan;
    const struct nsx_net *net = (const struct nsx_net *)((const char *)plan + plan->net);
    long rc;
    char ack;
    int sock;

    if (net->ns_sock < 0 || !net->wait)
        return 0;
    sock = start->fds[net->ns_sock];
    do {
        rc = nsx_rc(recv(sock, &ack, 1, 0));
    } while (rc == -EINTR);
    close(sock);
    return rc == 0 ? -ECONNABORTED : rc < 0 ? rc : 0;
}
