# filled by the systemd work
