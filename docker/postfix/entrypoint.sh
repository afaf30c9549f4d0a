#!/bin/sh
# Configure Postfix from the environment, then run the command (default: Postfix
# in the foreground; `postconf -n` shows the configuration).
#   POSTFIX_HOSTNAME  myhostname (default postfix.example.test)
#   POSTFIX_NETWORKS  mynetworks: who may relay (default the compose subnet)
#   TRACKER_NEXTHOP   where all mail goes (default [smtp-tracker]:10025)
set -eu
postconf -e \
    "myhostname = ${POSTFIX_HOSTNAME:-postfix.example.test}" \
    "mydestination =" \
    "inet_interfaces = all" \
    "inet_protocols = ipv4" \
    "mynetworks = 127.0.0.0/8 ${POSTFIX_NETWORKS:-172.28.0.0/24}" \
    "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination" \
    "transport_maps = inline:{ * = smtp:${TRACKER_NEXTHOP:-[smtp-tracker]:10025} }" \
    "smtp_host_lookup = native" \
    "smtp_tls_security_level = may" \
    "message_size_limit = 52428800" \
    "maillog_file = /dev/stdout" \
    "compatibility_level = 3.6"
# no chroot: the container is the boundary, and the chroot would lack /etc/resolv.conf
postconf -F '*/*/chroot = n'
newaliases
exec "$@"
