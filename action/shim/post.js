'use strict';
require('./run').run('post');
