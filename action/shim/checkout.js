'use strict';
require('./run').run('checkout');
