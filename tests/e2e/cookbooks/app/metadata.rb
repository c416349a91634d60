name 'app'
version '1.0.0'
description 'Test application cookbook for the end-to-end tests'
