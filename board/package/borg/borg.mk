################################################################################
#
# borg
#
################################################################################

# Built from this checkout (the BR2_EXTERNAL tree lives in <repo>/board). For a release
# build from a tagged tarball instead, set BORG_SITE to the release URL, drop
# BORG_SITE_METHOD and the BUILD_CMDS override below, and add borg.hash: buildroot's
# cargo-package infrastructure then vendors the dependencies at download time and builds
# offline.
BORG_VERSION = 0.1.0
BORG_SITE = $(BR2_EXTERNAL_BORGIOS_PATH)/..
BORG_SITE_METHOD = local
BORG_LICENSE = MIT or Apache-2.0
BORG_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = --exclude target --exclude out --exclude .git

BORG_CARGO_FEATURES = $(if $(BR2_PACKAGE_BORG_GPIO_LEDS),--features borg-system/gpio)
BORG_CARGO_BUILD_OPTS = -p borg $(BORG_CARGO_FEATURES)

# Local sources are not vendored by the download step, so this build may fetch crates
# (Cargo.lock pins them; --locked keeps it reproducible). Everything else is the
# cargo-package environment (cross linker, target triple, profiles).
define BORG_BUILD_CMDS
	cd $(@D) && \
	$(TARGET_MAKE_ENV) $(TARGET_CONFIGURE_OPTS) $(PKG_CARGO_ENV) \
		cargo build --release --locked --manifest-path Cargo.toml $(BORG_CARGO_BUILD_OPTS)
endef

define BORG_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 $(@D)/target/$(RUSTC_TARGET_NAME)/release/borg \
		$(TARGET_DIR)/usr/bin/borg
	mkdir -p $(TARGET_DIR)/sbin
	ln -sf ../usr/bin/borg $(TARGET_DIR)/sbin/init
endef

$(eval $(cargo-package))
