// txring: how fast a TPACKET_V2 TX ring with a 12-byte virtio net header sends small frames.
// A measurement probe for docs/performance.md ("TX through a PACKET_TX_RING"), not part of
// vhost-packet. Run it inside a network namespace that you created, on a veth end whose peer
// drops the frames (they go to 02:00:00:00:00:fe, a MAC no one has):
//
//   gcc -O2 -o /tmp/txring qemu/probes/txring.c
//   ip netns exec NS /tmp/txring IFNAME SECONDS BYPASS VNET_HDR_LEN BATCH FRAME_SIZE FRAME_NR
//   ip netns exec NS /tmp/txring vh0 2 1 12 64 2048 1024
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef PACKET_VNET_HDR_SZ
#define PACKET_VNET_HDR_SZ 24
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s IFNAME SECONDS BYPASS VNET_HDR_LEN BATCH FRAME_SIZE FRAME_NR\n", argv[0]);
        return 2;
    }
    const char *ifname = argv[1];
    double secs = atof(argv[2]);
    int bypass = atoi(argv[3]), vnet = atoi(argv[4]), batch = atoi(argv[5]);
    unsigned frame_size = atoi(argv[6]), frame_nr = atoi(argv[7]);

    int s = socket(AF_PACKET, SOCK_RAW, 0);
    if (s < 0) die("socket");
    // The header size must be set before the ring exists (EBUSY after).
    if (vnet && setsockopt(s, SOL_PACKET, PACKET_VNET_HDR_SZ, &vnet, sizeof vnet)) die("PACKET_VNET_HDR_SZ");
    int version = TPACKET_V2;
    if (setsockopt(s, SOL_PACKET, PACKET_VERSION, &version, sizeof version)) die("PACKET_VERSION");
    if (bypass && setsockopt(s, SOL_PACKET, PACKET_QDISC_BYPASS, &bypass, sizeof bypass)) die("PACKET_QDISC_BYPASS");
    struct tpacket_req req = {.tp_frame_size = frame_size};
    req.tp_block_size = frame_size * 16 > 4096 ? frame_size * 16 : 4096;
    req.tp_block_nr = frame_nr / (req.tp_block_size / frame_size);
    req.tp_frame_nr = req.tp_block_nr * (req.tp_block_size / frame_size);
    if (setsockopt(s, SOL_PACKET, PACKET_TX_RING, &req, sizeof req)) die("PACKET_TX_RING");
    uint8_t *ring = mmap(NULL, (size_t)req.tp_block_size * req.tp_block_nr, PROT_READ | PROT_WRITE, MAP_SHARED, s, 0);
    if (ring == MAP_FAILED) die("mmap");
    struct sockaddr_ll sll = {
        .sll_family = AF_PACKET, .sll_protocol = 0, .sll_ifindex = if_nametoindex(ifname)};
    if (!sll.sll_ifindex) die("if_nametoindex");
    if (bind(s, (struct sockaddr *)&sll, sizeof sll)) die("bind");

    // 60 bytes: to 02:00:00:00:00:fe, an IEEE experimental ethertype.
    uint8_t frame[60] = {0x02, 0, 0, 0, 0, 0xfe, 0x02, 0, 0, 0, 0, 0x01, 0x88, 0xb5};
    unsigned head = 0;
    long queued = 0, calls = 0, full = 0;
    double t0 = now();
    while (now() - t0 < secs) {
        int n = 0;
        for (; n < batch; n++) {
            struct tpacket2_hdr *h = (void *)(ring + (size_t)head * frame_size);
            if (h->tp_status != TP_STATUS_AVAILABLE) {
                full++;
                break;
            }
            // Data starts right after the header's aligned part (no PACKET_TX_HAS_OFF).
            uint8_t *d = (uint8_t *)h + TPACKET2_HDRLEN - sizeof(struct sockaddr_ll);
            memset(d, 0, vnet);
            memcpy(d + vnet, frame, sizeof frame);
            h->tp_len = vnet + sizeof frame;
            __atomic_store_n(&h->tp_status, TP_STATUS_SEND_REQUEST, __ATOMIC_RELEASE);
            head = (head + 1) % req.tp_frame_nr;
        }
        if (send(s, NULL, 0, MSG_DONTWAIT) < 0 && errno != EAGAIN && errno != ENOBUFS) die("send");
        calls++;
        queued += n;
    }
    double t = now() - t0;
    printf("txring bypass=%d vnet=%d batch=%d: %.0f pps (%ld send calls, ring full %ld times)\n",
           bypass, vnet, batch, queued / t, calls, full);
    return 0;
}
