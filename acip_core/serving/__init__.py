"""What the app serves: the Studio (artifacts, jobs, downloads) and its Explorers, under public-mode
policy. The app's handlers call only this layer."""
