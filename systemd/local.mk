# systemd/local.mk - included by Makefile.am: the service unit, sysusers.d and
# tmpfiles.d entries, the journal catalog, the example configuration and the
# man pages.  Templates (*.in) are filled in at make time, not by configure,
# so "make prefix=..." and "make install DESTDIR=..." see the final paths
# (see "Installation Directory Variables" in the autoconf manual).
#
# Generated files go under gen/ in the build tree, outside systemd/ (which
# EXTRA_DIST ships whole), so an in-tree build never puts them in a tarball.
# sysusers.d and tmpfiles.d only read files named *.conf: the generated copies
# carry that name, so plain automake _DATA rules install and uninstall them.

systemd_edit = sed \
	-e 's|@sbindir[@]|$(sbindir)|g' \
	-e 's|@bindir[@]|$(bindir)|g' \
	-e 's|@sysconfdir[@]|$(sysconfdir)|g' \
	-e 's|@localstatedir[@]|$(localstatedir)|g'

# $(systemd_generate) IN: write the target from template IN, refusing to leave
# an @...dir@ placeholder unsubstituted.
systemd_generate = $(AM_V_GEN)$(MKDIR_P) $(@D) && rm -f $@ $@.tmp && \
	$(systemd_edit)

systemd_finish = >$@.tmp && \
	if grep -n '@[a-z_]*dir@' $@.tmp >&2; then echo "$@: unsubstituted variable" >&2; rm -f $@.tmp; exit 1; fi && \
	mv $@.tmp $@

gen/tdrain@.service: $(srcdir)/systemd/tdrain@.service.in Makefile
	$(systemd_generate) $(srcdir)/systemd/tdrain@.service.in $(systemd_finish)

gen/sysusers.d/tdrain.conf: $(srcdir)/systemd/tdrain.sysusers Makefile
	$(systemd_generate) $(srcdir)/systemd/tdrain.sysusers $(systemd_finish)

gen/tmpfiles.d/tdrain.conf: $(srcdir)/systemd/tdrain.tmpfiles.in Makefile
	$(systemd_generate) $(srcdir)/systemd/tdrain.tmpfiles.in $(systemd_finish)

systemdsystemunit_DATA = gen/tdrain@.service
sysusers_DATA = gen/sysusers.d/tdrain.conf
tmpfiles_DATA = gen/tmpfiles.d/tdrain.conf
dist_catalog_DATA = systemd/tdrain.catalog

# The example configuration, beside the file the unit reads.
tdrainconfdir = $(sysconfdir)/tdrain
dist_tdrainconf_DATA = systemd/tdrain.conf.example

dist_doc_DATA = docs/OPERATIONS.md

dist_man_MANS = docs/man/tdrain.8 docs/man/tdrainctl.8 docs/man/tdrain.conf.5

CLEANFILES = gen/tdrain@.service gen/sysusers.d/tdrain.conf gen/tmpfiles.d/tdrain.conf

EXTRA_DIST += systemd/tdrain@.service.in systemd/tdrain.sysusers systemd/tdrain.tmpfiles.in \
	systemd/local.mk scripts/systemd-ns.sh

# make distcheck installs under its own prefix: the unit directories, which
# configure took from systemd.pc as absolute paths, must follow it (daemon(7)).
# No quotes: $$dc_install_base is a shell variable of the distcheck recipe and
# must be expanded there; quoted, it would reach the Makefile and expand to
# nothing, and distcheck would install into the real /lib/systemd/system.
AM_DISTCHECK_CONFIGURE_FLAGS = \
	--with-systemdsystemunitdir=$${dc_install_base}$(systemdsystemunitdir) \
	--with-sysusersdir=$${dc_install_base}$(sysusersdir) \
	--with-tmpfilesdir=$${dc_install_base}$(tmpfilesdir) \
	--with-catalogdir=$${dc_install_base}$(catalogdir)

# Sanity checks of these files, run by "make check" through check-local.
# - every MESSAGE_ID in lib/log.c has a catalog entry, and no other;
# - every configuration key in lib/conf.c appears in tdrain.conf(5) and in
#   the example configuration;
# - the unit parses (systemd-analyze verify), when systemd-analyze exists.
systemd-check: gen/tdrain@.service
	$(AM_V_at)set -e; \
	ids_code=`sed -n 's/.*{ *"[a-z_]*", *"\([0-9a-f]\{32\}\)" *}.*/\1/p' $(srcdir)/lib/log.c | sort`; \
	ids_cat=`sed -n 's/^-- \([0-9a-f]\{32\}\)$$/\1/p' $(srcdir)/systemd/tdrain.catalog | sort`; \
	if test -z "$$ids_code" || test "$$ids_code" != "$$ids_cat"; then \
		echo "systemd/tdrain.catalog: MESSAGE_IDs differ from lib/log.c" >&2; \
		echo "code: $$ids_code" >&2; echo "catalog: $$ids_cat" >&2; exit 1; fi; \
	keys=`sed -n 's/^[[:space:]]*{ *"\([a-z_.]*\)", *K_[A-Z]*,.*/\1/p' $(srcdir)/lib/conf.c`; \
	test -n "$$keys" || { echo "no configuration keys found in lib/conf.c" >&2; exit 1; }; \
	for k in $$keys; do \
		grep -q -e "^#$$k = " -e "^#$$k =$$" $(srcdir)/systemd/tdrain.conf.example || \
			{ echo "systemd/tdrain.conf.example: key $$k missing" >&2; exit 1; }; \
		grep -q -x -F ".B $$k" $(srcdir)/docs/man/tdrain.conf.5 || \
			{ echo "docs/man/tdrain.conf.5: key $$k missing" >&2; exit 1; }; \
	done; \
	if command -v systemd-analyze >/dev/null 2>&1; then \
		d=`mktemp -d`; cp gen/tdrain@.service "$$d/"; \
		out=`systemd-analyze verify --man=no "$$d/tdrain@check.service" 2>&1 | grep -v 'is not executable' || :`; \
		rm -rf "$$d"; \
		if test -n "$$out"; then echo "$$out" >&2; echo "gen/tdrain@.service: systemd-analyze verify complained" >&2; exit 1; fi; \
	fi; \
	echo "systemd-check: catalog IDs, configuration keys and unit OK"

check-local: systemd-check

.PHONY: systemd-check
