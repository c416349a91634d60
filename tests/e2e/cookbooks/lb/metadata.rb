name 'lb'
version '1.0.0'
description 'Test load balancer cookbook for the end-to-end tests'
depends 'scalarium_base'
