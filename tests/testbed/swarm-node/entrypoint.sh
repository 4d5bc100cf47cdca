#!/bin/sh
# Make the node container a machine dockerd can run on, then run the given command (dockerd).
#
# The node is not --privileged (a host whose bounding set lacks a capability refuses that), so
# Docker has mounted sysfs and the cgroup hierarchies read-only. dockerd writes to both: mount
# them afresh, read-write, as seen from the node's own network and cgroup namespaces (the node
# runs with --cgroupns private, so the cgroups of its containers nest under the node's own).
set -eu
cgroup_fs=$(stat -fc %T /sys/fs/cgroup)
umount -R /sys
mount -t sysfs -o rw,nosuid,nodev,noexec sysfs /sys
if [ "$cgroup_fs" = cgroup2fs ]; then
    mount -t cgroup2 -o rw,nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
    # cgroup v2 lets a cgroup hand controllers to its children only while it holds no process
    # itself: move this shell (and anything else) into a leaf first. Untested: the test bed's
    # hosts so far run cgroup v1.
    mkdir -p /sys/fs/cgroup/node
    for pid in $(cat /sys/fs/cgroup/cgroup.procs); do echo "$pid" >/sys/fs/cgroup/node/cgroup.procs 2>/dev/null || :; done
    sed -e 's/^/+/' -e 's/ / +/g' /sys/fs/cgroup/cgroup.controllers >/sys/fs/cgroup/cgroup.subtree_control
else
    mount -t tmpfs -o rw,nosuid,nodev,noexec,mode=755 cgroup /sys/fs/cgroup
    # cgroup v1: one hierarchy per line of /proc/self/cgroup, "id:controllers:path" ("0::/" is v2's).
    while IFS=: read -r _ controllers _; do
        case $controllers in
            '') continue ;;
            name=*) dir=${controllers#name=}; options=none,$controllers ;;
            *) dir=$controllers; options=$controllers ;;
        esac
        mkdir -p "/sys/fs/cgroup/$dir"
        mount -t cgroup -o "rw,nosuid,nodev,noexec,$options" cgroup "/sys/fs/cgroup/$dir"
    done </proc/self/cgroup
fi
exec "$@"
