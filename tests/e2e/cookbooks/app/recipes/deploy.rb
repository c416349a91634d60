# The end-to-end tests' app server: deploy.
log "app deploy on #{node['opsworks']['instance']['hostname']}"
