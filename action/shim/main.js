'use strict';
require('./run').run('main');
