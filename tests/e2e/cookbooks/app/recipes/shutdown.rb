# The end-to-end tests' app server: shutdown.
log "app shutdown on #{node['opsworks']['instance']['hostname']}"
