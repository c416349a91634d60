name 'scalarium_base'
maintainer 'Scalarium'
license 'Apache-2.0'
description 'Built-in base recipe run first at setup: records what Scalarium knows about the node'
version '1.0.0'
chef_version '>= 14.0'

%w(ubuntu debian centos redhat rocky almalinux amazon fedora suse opensuseleap).each do |os|
  supports os
end
