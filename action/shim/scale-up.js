'use strict';
require('./run').run('scale-up');
